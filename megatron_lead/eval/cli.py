"""`megatron-lead eval`: accuracy, length and AES of checkpoints on benchmark files, with vLLM.

    megatron-lead eval --model base=runs/warmstart/model --model lead=runs/demo \\
        --benchmark arith [--benchmark math500=/data/math500.jsonl ...] --base base --out runs/eval
        [--max-len N] [--n N] [--temperature T] [--top-p P] [--seed S] [--aes 1,3,5] [--nproc N]
    torchrun --nproc-per-node 8 -m megatron_lead.cli eval ...

A model is an HF folder, a Megatron checkpoint of `megatron-lead convert`, a trainer checkpoint
(`RUN/checkpoints/step_N`) or a run folder (its final `hf/` export, else its newest checkpoint);
checkpoints are exported to HF folders under OUT/hf/ first (once). Results accumulate in OUT:
a pair already evaluated with the same model files and settings is skipped, so a later call can
add models or benchmarks, and the table, CSV and plot always cover everything in OUT.
docs/EVAL.md documents the formats and outputs.
"""

from __future__ import annotations

import argparse
import os

HELP = "evaluate checkpoints on benchmarks with vLLM: accuracy, length, tokens per correct answer, AES"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                   help="model to evaluate (repeatable): HF folder, Megatron checkpoint, trainer checkpoint or run folder")
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME[=FILE]|FILE",
                   help="benchmark (repeatable): a preset (math500, olympiadbench, aime24, aime25, amc23, arith) "
                        "or a JSONL/Parquet file")
    p.add_argument("--out", required=True, help="output folder (results accumulate there)")
    p.add_argument("--base", default=None, help="name of the model AES is measured against")
    p.add_argument("--data-dir", default="data/benchmarks", help="where preset files are looked up (NAME.jsonl/.parquet)")
    p.add_argument("--max-len", type=int, default=None, help="maximum response tokens (overrides the presets)")
    p.add_argument("--n", type=int, default=None, help="samples per problem (overrides the presets)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (overrides the presets)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (overrides the presets)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-problem sampling seeds")
    p.add_argument("--aes", default="1,3,5", metavar="ALPHA,BETA,GAMMA", help="AES constants (default 1,3,5)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: each model's folder)")
    p.add_argument("--nproc", type=int, default=None, help="local ranks without torchrun (one vLLM replica each)")
    p.add_argument("--vllm-tp", type=int, default=1, help="vLLM tensor-parallel size (replicas = ranks / this)")
    p.add_argument("--dtype", default="auto", help="vLLM weight dtype (auto, float32, bfloat16)")
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="vLLM KV-cache size (default 256 MiB on CPU)")
    p.add_argument("--force", action="store_true", help="re-evaluate pairs already in OUT")
    p.add_argument("--report-only", action="store_true", help="only redraw the table, CSV and plot of OUT")


# ------------------------------------------------------------------------------- models

def _is_hf(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(path))


def _export_trainer_checkpoint(rank: int, world: int, step_dir: str, out_dir: str) -> None:
    """In its own process: the run's model built from its config, the checkpoint loaded, HF written."""
    import torch

    from megatron_lead.policy.convert.gather import save_hf_checkpoint
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.parallel import init_parallel
    from megatron_lead.trainer.checkpoint import load_checkpoint
    from megatron_lead.trainer.config import load_config

    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(step_dir)), "config.yaml"))
    init_parallel(1, 1, seed=cfg.seed)
    model = build_model(cfg.model.path, dtype=torch.float32, attention=cfg.model.attention, init_weights=False)
    load_checkpoint(step_dir, model, None, None, load_optimizer=False)
    save_hf_checkpoint(model, out_dir, hf_source_dir=cfg.model.tokenizer or cfg.model.path)


def resolve_model(spec: str, cache: str):
    """`[NAME=]PATH` -> ModelSpec with an HF folder; checkpoints are exported into cache/NAME."""
    from megatron_lead.eval.evaluate import ModelSpec

    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = os.path.basename(os.path.normpath(spec))
    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise ValueError(f"--model {spec!r}: give it a plain NAME=PATH")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {spec}: {path} is not a folder")
    if _is_hf(path):
        return ModelSpec(name, path, path)
    if os.path.isdir(os.path.join(path, "hf")) and _is_hf(os.path.join(path, "hf")):
        return ModelSpec(name, os.path.join(path, "hf"), path)  # a finished run's final export
    target = os.path.join(cache, name)
    stamp = os.path.join(target, ".source")
    step_dir = None
    if not os.path.isfile(os.path.join(path, "megatron_lead.json")):
        from megatron_lead.trainer.checkpoint import latest_checkpoint

        step_dir = path if os.path.isfile(os.path.join(path, "complete.json")) else \
            latest_checkpoint(os.path.join(path, "checkpoints"))
        if step_dir is None:
            raise ValueError(f"--model {spec}: {path} is neither an HF folder, a Megatron checkpoint, "
                             "a trainer checkpoint nor a run folder with hf/ or checkpoints/")
    source = os.path.abspath(step_dir or path)
    if _is_hf(target) and os.path.isfile(stamp) and open(stamp).read() == source:
        return ModelSpec(name, target, path)  # exported before
    if step_dir is None:
        from megatron_lead.policy.convert.checkpoint import megatron_to_hf

        megatron_to_hf(path, target, overwrite=True)
    else:
        from megatron_lead.launch import run_local

        run_local(_export_trainer_checkpoint, 1, step_dir, target, timeout=None)
    with open(stamp, "w") as f:
        f.write(source)
    return ModelSpec(name, target, path)


# ------------------------------------------------------------------------------- run

def build_config(args):
    from megatron_lead.eval.aes import AESConstants
    from megatron_lead.eval.benchmarks import resolve
    from megatron_lead.eval.evaluate import EvalConfig

    if not args.benchmark and not args.report_only:
        raise ValueError("give at least one --benchmark")
    benches = [resolve(b, args.data_dir, n=args.n, temperature=args.temperature, top_p=args.top_p,
                       max_len=args.max_len) for b in args.benchmark]
    names = [b.name for b in benches]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark names repeat: {names}")
    return EvalConfig(models=[], benchmarks=benches, out=args.out, seed=args.seed, tokenizer=args.tokenizer,
                      base=args.base, aes=AESConstants.parse(args.aes), vllm_tp=args.vllm_tp, dtype=args.dtype,
                      kv_cache_memory_bytes=args.kv_cache_bytes, force=args.force)


def _eval_rank(rank, world, cfg, todo):
    from megatron_lead.eval.evaluate import evaluate_rank

    return evaluate_rank(rank, world, cfg, todo)


def evaluate(cfg, model_specs: list[str], nproc: int | None = None) -> list[dict]:
    """Resolve the models, evaluate what is not in cfg.out yet, merge, write; returns all rows.

    Under torchrun (WORLD_SIZE set) this is collective: rank 0 resolves and writes."""
    import torch.distributed as dist

    from megatron_lead.eval.evaluate import merge_rows, pending, read_results, write_results

    torchrun = "WORLD_SIZE" in os.environ
    if torchrun and not dist.is_initialized():
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank0 = not torchrun or dist.get_rank() == 0
    cache = os.path.join(cfg.out, "hf")
    if rank0:
        os.makedirs(cfg.out, exist_ok=True)
        cfg.models = [resolve_model(m, cache) for m in model_specs]
    if torchrun:
        box = [cfg.models]
        dist.broadcast_object_list(box, src=0)
        cfg.models = box[0]
    names = [m.name for m in cfg.models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names repeat: {names}")
    rows = read_results(cfg.out)
    todo = pending(cfg, rows)
    if todo:
        if torchrun:
            new = _eval_rank(dist.get_rank(), dist.get_world_size(), cfg, todo)
        else:
            from megatron_lead.launch import run_local

            new = run_local(_eval_rank, nproc or 1, cfg, todo, timeout=None)[0]
        if rank0:
            rows = merge_rows(rows, new)
            write_results(cfg.out, rows)
    return rows


def report(out: str, rows: list[dict], base: str | None, constants) -> dict[str, str]:
    """Write results.md, results.csv and accuracy_vs_length.png of all rows; return their paths."""
    from megatron_lead.eval.plots import accuracy_vs_length
    from megatron_lead.eval.tables import levels_markdown, markdown, to_csv, with_aes

    rows = with_aes(rows, base, constants)
    paths = {"md": os.path.join(out, "results.md"), "csv": os.path.join(out, "results.csv"),
             "png": os.path.join(out, "accuracy_vs_length.png")}
    head = f"AES against {base!r} with (alpha_len, beta, gamma) = ({constants.alpha_len:g}, " \
           f"{constants.beta:g}, {constants.gamma:g})" if base else "no --base: no AES"
    levels = levels_markdown(rows)
    with open(paths["md"], "w") as f:
        f.write(f"# Evaluation\n\n{head}\n\n{markdown(rows)}\n" + (f"\n## Per level\n\n{levels}" if levels else ""))
    with open(paths["csv"], "w") as f:
        f.write(to_csv(rows))
    if rows:
        accuracy_vs_length(rows, paths["png"], base)
    return paths


def run(args: argparse.Namespace) -> int:
    from megatron_lead.eval.evaluate import read_results
    from megatron_lead.eval.tables import markdown, with_aes

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    cfg = build_config(args)
    if args.report_only:
        rows = read_results(cfg.out)
    else:
        if not args.model:
            raise ValueError("give at least one --model")
        if args.nproc is not None and args.nproc < 1:
            raise ValueError(f"--nproc {args.nproc} must be >= 1")
        if "WORLD_SIZE" in os.environ and args.nproc not in (None, int(os.environ["WORLD_SIZE"])):
            raise ValueError(f"--nproc {args.nproc} conflicts with torchrun's WORLD_SIZE={os.environ['WORLD_SIZE']}")
        rows = evaluate(cfg, args.model, args.nproc)
    if "WORLD_SIZE" in os.environ and int(os.environ.get("RANK", "0")) != 0:
        return 0
    if cfg.base is not None and not any(r["model"] == cfg.base for r in rows):
        raise ValueError(f"--base {cfg.base}: no such model in {cfg.out} (evaluate it with --model {cfg.base}=PATH)")
    paths = report(cfg.out, rows, cfg.base, cfg.aes)
    print(markdown(with_aes(rows, cfg.base, cfg.aes)))
    print(f"\n{paths['md']}, {paths['csv']}, {paths['png']}, per-sample files in {os.path.join(cfg.out, 'samples')}")
    return 0
