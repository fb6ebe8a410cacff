"""The evaluation itself: models x benchmarks on vLLM replicas, graded, summarised, written.

Runs on every rank of a process group (`launch.run_local` for `--nproc N`, or torchrun), exactly
like a training step's rollouts: every rank hosts one in-process vLLM worker, replica r generates
the r-th contiguous slice of a benchmark's prompts (`rollout.step.generate_distributed`), every
rank gets every response, and rank r grades responses r, r + world, ... (`trainer.grading`).
Sampling seeds follow the problem (run seed, problem position), not the rank, so 1 and N ranks
give the same samples; the same problem gets the same seed for every model.

Models are evaluated one after another in one engine: on CPU a model with the same architecture
as the engine's is swapped in through the trainer's weight-reload path (no second engine start,
which is most of the cost of a small model); otherwise the engine is restarted.

Unlike training (where a truncated rollout scores 0 without grading), every response is graded,
truncated or not, so the per-sample file re-grades with `megatron-lead grade` to the same scores.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from megatron_lead.eval.aes import AESConstants, summarise, summarise_by_level
from megatron_lead.eval.benchmarks import Benchmark

RESULTS_FILE = "results.json"
SAMPLES_DIR = "samples"


@dataclass
class ModelSpec:
    """A model to evaluate."""

    name: str
    """Its name in tables and plots (and the key of the AES base)."""
    path: str
    """HF folder vLLM loads (a Megatron checkpoint has been exported to one already)."""
    source: str = ""
    """What the user named (the checkpoint or run folder), for the results file."""


@dataclass
class EvalConfig:
    """Everything one `megatron-lead eval` run needs (the command line, resolved)."""

    models: list[ModelSpec]
    """Models in evaluation order."""
    benchmarks: list[Benchmark]
    """Benchmarks, each with its prompting and sampling."""
    out: str
    """Output folder: results.json/.md/.csv, accuracy_vs_length.png, samples/."""
    seed: int = 0
    """Seeds the per-problem sampling seeds."""
    tokenizer: str | None = None
    """Tokenizer folder; None = each model's own folder."""
    base: str | None = None
    """Name of the model AES is measured against (a model of this or an earlier run into `out`)."""
    aes: AESConstants = field(default_factory=AESConstants)
    """AES constants (alpha_len, beta, gamma)."""
    vllm_tp: int = 1
    """vLLM tensor-parallel size; replicas = world / this."""
    dtype: str = "auto"
    """vLLM weight dtype."""
    kv_cache_memory_bytes: int | None = None
    """vLLM KV-cache size; None: 256 MiB on CPU, vLLM's memory fraction on GPU."""
    enforce_eager: bool = False
    """No CUDA graphs (faster start, slower decoding); always eager on CPU."""
    grader_workers: int = 2
    """Grader processes per rank."""
    grader_timeout: float = 5.0
    """Seconds per answer before it scores 0 (reason timeout)."""
    force: bool = False
    """Re-evaluate pairs already in results.json with the same settings."""


def samples_path(out: str, model: str, bench: str) -> str:
    return os.path.join(out, SAMPLES_DIR, f"{model}__{bench}.jsonl")


def row_key(model: ModelSpec, bench: Benchmark, seed: int) -> dict:
    """What makes an earlier result reusable: the same model files, benchmark settings and seed."""
    return {"model_path": os.path.abspath(model.path), "settings": bench.settings(), "seed": seed}


def read_results(out: str) -> list[dict]:
    path = os.path.join(out, RESULTS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def pending(cfg: EvalConfig, rows: list[dict]) -> list[tuple[int, int]]:
    """(model index, benchmark index) pairs still to evaluate, in order."""
    done = {(r["model"], r["benchmark"]): r for r in rows}
    todo = []
    for mi, m in enumerate(cfg.models):
        for bi, b in enumerate(cfg.benchmarks):
            old = done.get((m.name, b.name))
            fresh = (old is not None and all(old.get(k) == v for k, v in row_key(m, b, cfg.seed).items())
                     and os.path.isfile(samples_path(cfg.out, m.name, b.name)))
            if cfg.force or not fresh:
                todo.append((mi, bi))
    return todo


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """old rows with any (model, benchmark) in new replaced, new ones appended; order kept."""
    index = {(r["model"], r["benchmark"]): i for i, r in enumerate(old)}
    rows = list(old)
    for r in new:
        key = (r["model"], r["benchmark"])
        if key in index:
            rows[index[key]] = r
        else:
            index[key] = len(rows)
            rows.append(r)
    return rows


def _config_json(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(key, None)
    return config


class _Engines:
    """One vLLM engine for a sequence of models: weights swapped when the architecture allows."""

    def __init__(self, cfg: EvalConfig, max_model_len: int):
        self.cfg, self.max_model_len = cfg, max_model_len
        self.engine, self.config = None, None
        self.starts, self.swaps = 0, 0

    def load(self, model: ModelSpec):
        from megatron_lead.policy.convert.hf_io import iter_hf_folder
        from megatron_lead.rollout.engine import EngineConfig, RolloutEngine, on_cpu
        from megatron_lead.rollout.sync.reload import ReloadWeightSync

        config = _config_json(model.path)
        if self.engine is not None and on_cpu() and config == self.config:
            ReloadWeightSync(self.engine).push(iter([list(iter_hf_folder(model.path))]))
            self.swaps += 1
            return self.engine
        self.close()
        kv = self.cfg.kv_cache_memory_bytes
        if kv is None and on_cpu():
            kv = 256 << 20
        self.engine = RolloutEngine(EngineConfig(
            model_path=model.path, tensor_parallel_size=self.cfg.vllm_tp, dtype=self.cfg.dtype,
            max_model_len=self.max_model_len, kv_cache_memory_bytes=kv,
            enforce_eager=self.cfg.enforce_eager or on_cpu(), seed=self.cfg.seed))
        self.config = config
        self.starts += 1
        return self.engine

    def close(self):
        if self.engine is not None:
            self.engine.close()
        self.engine = None


def _encode(bench: Benchmark, tokenizer: str):
    from megatron_lead.data import DataStats, PromptEncoder, load_prompts

    stats = DataStats()
    encoder = PromptEncoder(tokenizer, instruction=bench.instruction, use_chat_template=bench.use_chat_template,
                            max_prompt_len=bench.max_prompt_len)
    records, ids = encoder.encode(load_prompts(bench.path, stats), stats)
    if not records:
        raise ValueError(f"benchmark {bench.name}: every prompt is longer than max_prompt_len="
                         f"{bench.max_prompt_len} tokens")
    return encoder, records, ids, stats


def evaluate_rank(rank: int, world: int, cfg: EvalConfig, todo: list[tuple[int, int]]) -> list[dict]:
    """Collective over the default process group: evaluate the `todo` pairs.

    Rank 0 writes each pair's per-sample JSONL and returns the result rows; other ranks return [].
    """
    import torch.distributed as dist

    from megatron_lead.rewards import Grader
    from megatron_lead.rollout.engine import SamplingConfig
    from megatron_lead.rollout.step import generate_distributed, sampling_seed
    from megatron_lead.trainer.grading import grade_rollouts

    if world % cfg.vllm_tp:
        raise ValueError(f"--vllm-tp {cfg.vllm_tp} does not divide the {world} ranks")
    encoded = {}
    for mi, bi in todo:  # tokenise first: the engine's max_model_len must fit the longest prompt
        tok = cfg.tokenizer or cfg.models[mi].path
        if (tok, bi) not in encoded:
            encoded[(tok, bi)] = _encode(cfg.benchmarks[bi], tok)
    longest = max((len(p) + cfg.benchmarks[bi].max_len for (_, bi), e in encoded.items() for p in e[2]), default=1)
    engines = _Engines(cfg, longest)
    rows = []
    grader = Grader(num_workers=cfg.grader_workers, timeout=cfg.grader_timeout)
    try:
        for mi in sorted({mi for mi, _ in todo}):
            model = cfg.models[mi]
            start = time.perf_counter()
            engine = engines.load(model)
            load_seconds = time.perf_counter() - start
            for bi in [b for m, b in todo if m == mi]:
                bench = cfg.benchmarks[bi]
                encoder, records, ids, stats = encoded[(cfg.tokenizer or model.path, bi)]
                start = time.perf_counter()
                sampling = SamplingConfig(n=bench.n, temperature=bench.temperature, top_p=bench.top_p,
                                          max_response_len=bench.max_len)
                seeds = [sampling_seed(cfg.seed, 0, i) for i in range(len(ids))]
                rollouts, _ = generate_distributed(engine, ids, seeds, sampling, cfg.vllm_tp)
                gen_seconds = time.perf_counter() - start
                answers = [r.answer for r in records]
                scores, reasons = grade_rollouts(grader, encoder.decode, rollouts, answers, grade_truncated=True)
                if rank != 0:
                    continue
                samples = []
                for k, (r, score, reason) in enumerate(zip(rollouts, scores, reasons)):
                    rec = records[r.prompt_index]
                    samples.append({"model": model.name, "benchmark": bench.name, "id": rec.id, "level": rec.level,
                                    "sample": k % bench.n, "problem": rec.problem, "answer": rec.answer,
                                    "response": encoder.decode(r.response_ids), "correct": score > 0.5,
                                    "reason": reason, "length": len(r.response_ids), "truncated": r.truncated})
                _write_jsonl(samples_path(cfg.out, model.name, bench.name), samples)
                rows.append({"model": model.name, "benchmark": bench.name, "source": model.source,
                             **row_key(model, bench, cfg.seed), **summarise(samples),
                             "levels": summarise_by_level(samples), "dropped_too_long": stats.dropped_too_long,
                             "skipped_rows": stats.skipped, "world_size": world,
                             "generate_seconds": gen_seconds, "seconds": time.perf_counter() - start,
                             "engine_load_seconds": load_seconds})
                load_seconds = 0.0
    finally:
        grader.close()
        engines.close()
    dist.barrier()
    return rows


def _write_jsonl(path: str, objs: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for o in objs:
            f.write(json.dumps(o) + "\n")
    os.replace(tmp, path)


def write_results(out: str, rows: list[dict]) -> str:
    path = os.path.join(out, RESULTS_FILE)
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(path + ".tmp", path)
    return path
