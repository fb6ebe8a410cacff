"""`megatron-lead sft`: supervised warm start through Megatron (next-token loss on the responses).

    megatron-lead sft --data train.jsonl --model-config config.json --tokenizer TOK/ --out model/
        [--init-from HF/] [--steps 600] [--batch-size 64] [--lr 3e-3] [--pack-max-tokens 0] [--nproc N]

Data lines `{"problem": prompt text, "solution": response text}`; the loss is the token-mean
negative log-likelihood of the response tokens and the EOS after them (the prompt is context
only). The model is built by Megatron from an HF config (random init) or from an HF folder
(--init-from); the result is an ordinary HF folder (weights + config + tokenizer) that
`megatron-lead train`, transformers and vLLM load. A finished run writes `sft.json` with a hash of
its inputs and settings; the same command again returns at once (the cache of the main job).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch

HELP = "supervised warm start of a policy through Megatron (from scratch or an HF folder)"
DONE_FILE = "sft.json"


@dataclass
class SFTConfig:
    data: str
    """JSONL with `problem` (the prompt text, as the trainer will send it) and `solution`."""
    tokenizer: str
    """HF tokenizer folder (also copied into the output)."""
    out: str
    """Output HF folder."""
    model_config: str | None = None
    """HF config.json of a model trained from scratch (Megatron's random init)."""
    init_from: str | None = None
    """HF folder to start from instead of a random init."""
    steps: int = 600
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences per step (over all data-parallel ranks)."""
    micro_batch_size: int = 32
    """Sequences per forward/backward on one rank."""
    lr: float = 3e-3
    """Peak learning rate (linear warmup, cosine decay to lr / 10)."""
    warmup_steps: int = 30
    seed: int = 0
    log_every: int = 50
    pack_max_tokens: int = 0
    """> 0: each step's rows are packed back to back (no padding) into micro-batches of at most
    this many tokens, attention kept within each row (policy/packing.py); micro_batch_size is
    then unused. 0: right-padded micro-batches of micro_batch_size rows."""


def _inputs_hash(cfg: SFTConfig) -> str:
    h = hashlib.sha256(json.dumps({k: v for k, v in asdict(cfg).items() if k != "log_every"},
                                  sort_keys=True).encode())
    for path in (cfg.data, cfg.model_config, os.path.join(cfg.tokenizer, "tokenizer.json")):
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def is_done(cfg: SFTConfig) -> bool:
    """True when cfg.out holds a finished run of exactly these inputs and settings."""
    path = os.path.join(cfg.out, DONE_FILE)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("inputs_sha256") == _inputs_hash(cfg)


def _examples(cfg: SFTConfig, tokenizer) -> list[tuple[list[int], int]]:
    """(token ids of prompt + solution + EOS, prompt length) of every data line."""
    out = []
    with open(cfg.data) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, solution = row["problem"], row["solution"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{cfg.data} line {n}: need a JSON object with 'problem' and 'solution'") from None
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            s = tokenizer(solution, add_special_tokens=False)["input_ids"]
            out.append((p + s + [tokenizer.eos_token_id], len(p)))
    if not out:
        raise ValueError(f"{cfg.data}: no examples")
    return out


def _batch(examples, rows: list[int], pad_id: int):
    width = max(len(examples[i][0]) for i in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for j, i in enumerate(rows):
        ids, p = examples[i]
        tokens[j, :len(ids)] = torch.tensor(ids)
        mask[j, p:len(ids)] = True  # response tokens and the EOS: predicted from what precedes
    return tokens, mask


def _micro_batches(cfg: SFTConfig, examples, rows: list[int], pad_id: int) -> list[dict]:
    """This rank's rows as padded micro-batches, or packed ones (cfg.pack_max_tokens)."""
    tokens, mask = _batch(examples, rows, pad_id)
    if cfg.pack_max_tokens > 0:
        from megatron_lead.policy.packing import pack_micro_batches

        # A row's length is up to its last response token, the EOS: its whole text.
        packs = pack_micro_batches(max_tokens=cfg.pack_max_tokens, tokens=tokens, response_mask=mask)
        return [p.as_dict() for p in packs]
    return [{"tokens": tokens[i:i + cfg.micro_batch_size], "response_mask": mask[i:i + cfg.micro_batch_size]}
            for i in range(0, len(rows), cfg.micro_batch_size)]


def _nll_loss(logits, batch):
    from megatron_lead.policy.logprobs import sequence_logprobs
    from megatron_lead.policy.packing import packed_sequence_logprobs

    tokens = batch["tokens"].to(logits.device)
    if "cu_seqlens" in batch:  # a pack: no prediction across the boundary of two rows
        logp, _ = packed_sequence_logprobs(logits, tokens, batch["cu_seqlens"])
    else:
        logp, _ = sequence_logprobs(logits, tokens)
    mask = batch["response_mask"].to(logits.device)
    nll = -torch.where(mask, logp, 0.0).sum()
    count = mask.sum().to(torch.int)
    return nll, count, {"nll": nll.detach(), "tokens": count.detach().float()}


def _skeleton(cfg: SFTConfig, folder: str) -> None:
    """config.json + tokenizer files: what the HF export copies next to the weights."""
    from megatron_lead.policy.convert import hf_io

    os.makedirs(folder, exist_ok=True)
    hf_io.copy_hf_side_files(cfg.init_from or cfg.tokenizer, folder)
    if cfg.init_from:
        hf_io.copy_hf_side_files(cfg.tokenizer, folder)
    # The model's config wins over any config.json a tokenizer folder carries.
    shutil.copy(cfg.model_config or os.path.join(cfg.init_from, "config.json"), os.path.join(folder, "config.json"))


def run_sft(cfg: SFTConfig, progress: bool = True) -> dict:
    """Collective over all ranks (any DP size; TP = PP = 1): train and export; returns stats."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from transformers import AutoTokenizer

    from megatron_lead.policy.convert.checkpoint import load_hf_weights
    from megatron_lead.policy.convert.gather import save_hf_checkpoint
    from megatron_lead.policy.model import build_model, forward_backward
    from megatron_lead.policy.optim import OptimConfig, build_optimizer, optimizer_step, wrap_ddp
    from megatron_lead.policy.parallel import init_parallel, reduce_scalars

    if (cfg.model_config is None) == (cfg.init_from is None):
        raise ValueError("sft: give exactly one of --model-config (from scratch) and --init-from (an HF folder)")
    init_parallel(1, 1, seed=cfg.seed)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows_per_micro = 1 if cfg.pack_max_tokens > 0 else cfg.micro_batch_size  # packs are sized in tokens
    if cfg.batch_size % (dp * rows_per_micro):
        raise ValueError(f"sft: batch_size {cfg.batch_size} does not split into {dp} rank(s) x "
                         + (f"micro_batch_size {cfg.micro_batch_size}" if rows_per_micro > 1 else "packs"))
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)
    examples = _examples(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    torch.manual_seed(cfg.seed)  # Megatron's CPU init draws from the default generator
    model = build_model(cfg.init_from or cfg.model_config, init_weights=cfg.init_from is None)
    if cfg.init_from:
        load_hf_weights(model, cfg.init_from)
    optim = OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, lr_schedule="cosine", warmup_steps=cfg.warmup_steps,
                        total_steps=cfg.steps, weight_decay=0.0, clip_grad=1.0)
    model = wrap_ddp(model, optim)
    optimizer, scheduler = build_optimizer(model, optim)

    gen = torch.Generator().manual_seed(cfg.seed)
    per_rank = cfg.batch_size // dp
    bar = None
    if progress and dist.get_rank() == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="SFT warm start", unit="step", dynamic_ncols=True)
    start, history = time.perf_counter(), []
    for step in range(cfg.steps):
        rows = torch.randint(len(examples), (cfg.batch_size,), generator=gen).tolist()
        mine = rows[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        micro = _micro_batches(cfg, examples, mine, pad_id)
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        stats = forward_backward(model, micro, _nll_loss, forward_only=False)
        info = optimizer_step(optimizer, scheduler)
        nll = sum(float(s["nll"]) for s in stats)
        count = sum(float(s["tokens"]) for s in stats)
        nll, count = reduce_scalars([nll, count], [parallel_state.get_data_parallel_group()])
        loss = nll / max(count, 1.0)
        if not math.isfinite(loss):
            raise RuntimeError(f"sft: the loss became {loss} at step {step}")
        history.append(loss)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start

    skeleton = cfg.out.rstrip("/") + ".skeleton"
    if dist.get_rank() == 0:
        _skeleton(cfg, skeleton)
    dist.barrier()
    save_hf_checkpoint(model, cfg.out, hf_source_dir=skeleton)
    result = {"inputs_sha256": _inputs_hash(cfg), "steps": cfg.steps, "seconds": seconds,
              "final_loss": sum(history[-20:]) / len(history[-20:]), "first_loss": history[0],
              "examples": len(examples), "settings": asdict(cfg)}
    if dist.get_rank() == 0:
        shutil.rmtree(skeleton, ignore_errors=True)
        with open(os.path.join(cfg.out, DONE_FILE), "w") as f:
            json.dump(result, f, indent=2)
    dist.barrier()
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="JSONL with 'problem' (prompt text) and 'solution'")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer folder")
    p.add_argument("--out", required=True, help="output HF folder")
    p.add_argument("--model-config", help="HF config.json: train from scratch")
    p.add_argument("--init-from", help="HF folder to start from")
    for name, kind in (("steps", int), ("batch-size", int), ("micro-batch-size", int), ("lr", float),
                       ("warmup-steps", int), ("seed", int), ("pack-max-tokens", int)):
        p.add_argument(f"--{name}", type=kind, default=getattr(SFTConfig, name.replace("-", "_")))
    p.add_argument("--nproc", type=int, default=1, help="local data-parallel processes (CPU)")
    p.add_argument("--force", action="store_true", help="train even if --out holds this exact run")


def _sft_rank(rank: int, world: int, cfg: SFTConfig) -> dict:
    return run_sft(cfg)


def config_from_args(args) -> SFTConfig:
    return SFTConfig(data=args.data, tokenizer=args.tokenizer, out=args.out, model_config=args.model_config,
                     init_from=args.init_from, steps=args.steps, batch_size=args.batch_size,
                     micro_batch_size=args.micro_batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                     seed=args.seed, pack_max_tokens=args.pack_max_tokens)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    for key in ("data", "model_config"):
        path = getattr(cfg, key)
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"--{key.replace('_', '-')} {path} does not exist")
    if not args.force and is_done(cfg):
        print(f"sft: {cfg.out} already holds this run (inputs and settings unchanged); nothing to do")
        return 0
    if args.nproc > 1:
        from megatron_lead.launch import run_local

        result = run_local(_sft_rank, args.nproc, cfg, timeout=None)[0]
    else:
        result = run_sft(cfg)
    print(f"sft: {result['steps']} steps in {result['seconds']:.0f}s, loss {result['first_loss']:.3f} -> "
          f"{result['final_loss']:.3f}; wrote {cfg.out}")
    return 0
