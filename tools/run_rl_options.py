"""One short run per RL option of issue 20 on the built-in task: does each run end to end?

    .venv/bin/python tools/run_rl_options.py [--out runs/rl_options] [--options all|a,b,...]
        [--steps 3] [--prompts-per-step 16] [--rollouts 8] [--max-len 400]
        [--warmstart runs/warmstart] [--init HF_DIR] [key=value ...]

Every run starts from the demo's warm start (`trainer/warmstart.prepare`, cached in --warmstart;
built when missing: about 7 minutes of 2 cores) or from --init, with examples/arith/lead.yaml and
the same steps, prompts, rollouts and seed as `megatron-lead compare` uses, plus the option's
keys; each in its own process, in OUT/runs/OPTION. A finished run (summary.json with the steps)
is not run again. Not a tuning study: a handful of steps shows the option runs through the
trainer and what its metrics read, nothing about what it does to accuracy or length.

Writes OUT/rl_options.md (the command, the machine, one row per option: steps, wall time, mean
accuracy and length over the steps, the last loss, mean grad norm, updates per step, and the
option's own metrics) and OUT/rl_options.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import traceback

# name -> (what it is, overrides). Thresholds near 1 for the geometric mask: a per-token gap of
# 1% on average is already large; the product grows with the length, so its C is wider.
OPTIONS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("LEAD as configured, every option off", []),
    "tis": ("token-level truncated IS, C = 2", ["loss.rollout_tis_cap=2"]),
    "seq_mask_geometric": ("sequence masking, geometric mean, C = 1.01", ["loss.rollout_seq_mask=1.01"]),
    "seq_mask_product": ("sequence masking, product, C = 2",
                         ["loss.rollout_seq_mask=2", "loss.rollout_seq_ratio=product"]),
    "engine_bf16_corrected": ("vLLM in bf16, trainer in fp32: TIS C = 2 and geometric masking C = 1.01",
                              ["rollout.dtype=bfloat16", "loss.rollout_tis_cap=2", "loss.rollout_seq_mask=1.01"]),
    "agg_seq_mean_token_mean": ("loss.agg_mode=seq_mean_token_mean", ["loss.agg_mode=seq_mean_token_mean"]),
    "agg_seq_mean_token_sum": ("loss.agg_mode=seq_mean_token_sum", ["loss.agg_mode=seq_mean_token_sum"]),
    "agg_dr_grpo": ("loss.agg_mode=seq_mean_token_sum_norm (L_norm = max length)",
                    ["loss.agg_mode=seq_mean_token_sum_norm"]),
    "filter_lead": ("group filtering, keeping groups whose efficiency reward varies", ["rollout.filter_groups=true"]),
    "filter_dapo_refill": ("group filtering by correctness only (DAPO), up to 2 refill rounds",
                           ["rollout.filter_groups=true", "rollout.filter_keep_eff_varying=false",
                            "rollout.refill_max_rounds=2"]),
    "overlong_penalty": ("DAPO's soft overlong punishment over the last quarter of the budget",
                         ["loss.overlong_buffer={quarter}"]),
    "mask_truncated": ("truncated rollouts out of the loss", ["loss.mask_truncated=true"]),
    "entropy_bonus": ("entropy bonus 0.001 (the release's trainer config)", ["loss.entropy_coef=0.001"]),
}
# Each option's own metrics in the table (those present in metrics.jsonl, mean over the steps).
OWN = {
    "tis": ["rollout/logprob_diff", "rollout_corr/tis_weight_mean", "rollout_corr/tis_clipped_frac",
            "rollout_corr/token_ratio_max"],
    "seq_mask": ["rollout/logprob_diff", "rollout_corr/seq_masked_frac", "rollout_corr/seq_ratio_min",
                 "rollout_corr/seq_ratio_max"],
    "engine_bf16": ["rollout/logprob_diff", "rollout_corr/tis_clipped_frac", "rollout_corr/token_ratio_max",
                    "rollout_corr/seq_masked_frac"],
    "filter": ["filter/rounds", "filter/kept", "filter/kept_for_efficiency", "filter/dropped_all_correct",
               "filter/dropped_all_wrong", "filter/trained"],
    "overlong": ["overlong/penalty_mean", "overlong/penalized_frac"],
    "mask": ["overlong/masked_frac", "train/empty_updates"],
    "entropy": ["train/entropy"],
    "agg": ["train/pg_loss"],
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/rl_options")
    p.add_argument("--options", default="all", help=f"comma-separated, or all: {','.join(OPTIONS)}")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--max-len", type=int, default=400)
    p.add_argument("--config", default="examples/arith/lead.yaml")
    p.add_argument("--warmstart", default="runs/warmstart")
    p.add_argument("--init", default=None, help="HF folder to start from instead of the warm start")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of every run")
    return p.parse_args(argv)


def _train_rank(rank: int, world: int, config: str, overrides: list[str]) -> dict:
    from megatron_lead.trainer.config import load_config
    from megatron_lead.trainer.loop import train

    return train(load_config(config, overrides), resume=True)


def _sft_rank(rank: int, world: int, sft) -> None:
    from megatron_lead.trainer.sft import run_sft

    run_sft(sft)


def _names(text: str) -> list[str]:
    names = list(OPTIONS) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIONS]
    if bad or not names:
        raise SystemExit(f"--options: unknown {bad}; choose from {', '.join(OPTIONS)}")
    return names


def overrides_for(args, name: str, run_dir: str, model: str, train: str) -> list[str]:
    """compare's per-run settings (megatron_lead/eval/compare._overrides, method lead, seed 0)
    plus the option's keys."""
    half = args.prompts_per_step // 2 if args.prompts_per_step % 2 == 0 else args.prompts_per_step
    micro = 32 if (half * args.rollouts) % 32 == 0 else half * args.rollouts
    option = [o.format(quarter=args.max_len // 4) for o in OPTIONS[name][1]]
    return ([f"run_dir={run_dir}", "seed=0", f"model.path={model}", f"data.train_path={train}",
             "data.val_path=null", "validation.every=0", f"ppo.steps={args.steps}",
             f"data.prompts_per_step={args.prompts_per_step}", f"ppo.mini_batch_prompts={half}",
             f"rollout.n={args.rollouts}", f"ppo.micro_batch_size={micro}", f"rollout.max_response_len={args.max_len}",
             "checkpoint.every=0", "checkpoint.keep_last=1", "logging.progress=false"]
            + option + list(args.overrides))


def _own_keys(name: str) -> list[str]:
    for prefix, keys in OWN.items():
        if name.startswith(prefix):
            return keys
    return []


def summarise(name: str, run_dir: str, seconds: float | None, error: str | None) -> dict:
    """One table row from the run's metrics.jsonl (means over its steps; the loss of the last)."""
    row = {"option": name, "what": OPTIONS[name][0], "seconds": seconds, "error": error, "steps": 0}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return row
    with open(path) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    if not steps:
        return row

    def mean(key):
        values = [s[key] for s in steps if isinstance(s.get(key), (int, float))]
        return sum(values) / len(values) if values else None

    row.update(steps=len(steps), accuracy=mean("reward/correct_mean"), length=mean("response/length_mean"),
               loss=steps[-1].get("train/loss"), grad_norm=mean("train/grad_norm"), updates=mean("train/updates"),
               step_seconds=mean("time/step_seconds"),
               own={k: mean(k) for k in _own_keys(name) if mean(k) is not None})
    return row


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict], command: str, machine: str, settings: str) -> str:
    head = ["option", "steps", "wall s", "s / step", "accuracy", "length", "last loss", "grad norm",
            "updates / step", "the option's metrics (mean over steps)"]
    lines = [f"Command: `{command}`  ", f"Machine: {machine}  ", f"Settings: {settings}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        own = ", ".join(f"{k.split('/', 1)[1]} {_fmt(v, '.4g')}" for k, v in (r.get("own") or {}).items())
        if r["error"]:
            own = f"FAILED: {r['error']}"
        lines.append("| " + " | ".join([
            f"`{r['option']}`", str(r["steps"]), _fmt(r["seconds"], ".0f"), _fmt(r.get("step_seconds"), ".1f"),
            _fmt(None if r.get("accuracy") is None else 100 * r["accuracy"], ".1f") + ("%" if r.get("accuracy") is not None else ""),
            _fmt(r.get("length"), ".1f"), _fmt(r.get("loss"), ".4f"), _fmt(r.get("grad_norm"), ".3f"),
            _fmt(r.get("updates"), ".2g"), own or "-"]) + " |")
    lines.append("")
    lines += [f"- `{r['option']}`: {r['what']}" for r in rows]
    return "\n".join(lines) + "\n"


def machine() -> str:
    import torch

    try:
        import vllm
        vllm_version = vllm.__version__
    except Exception:  # noqa: BLE001 - the table names what is there
        vllm_version = "?"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores visible, "
            f"Python {platform.python_version()}, torch {torch.__version__}, vLLM {vllm_version}")


def main(argv=None) -> int:
    from megatron_lead.launch import run_local
    from megatron_lead.trainer.config import load_config
    from megatron_lead.trainer.sft import is_done
    from megatron_lead.trainer.warmstart import SFT_SETTINGS, prepare

    args = parse(argv)
    names = _names(args.options)
    if args.steps < 1 or args.prompts_per_step < 1 or args.rollouts < 2:
        raise SystemExit("need --steps >= 1, --prompts-per-step >= 1, --rollouts >= 2")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.makedirs(args.out, exist_ok=True)
    command = " ".join([".venv/bin/python", "tools/run_rl_options.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])
    start = time.perf_counter()

    sft, paths = prepare(args.warmstart, SFT_SETTINGS["steps"])
    if args.init:
        sft.out = args.init
    elif not is_done(sft):
        print(f"warm start: {sft.steps} SFT steps (about 7 minutes on 2 cores)", flush=True)
        run_local(_sft_rank, 1, sft, timeout=None)

    rows = []
    for k, name in enumerate(names, 1):
        run_dir = os.path.join(args.out, "runs", name)
        overrides = overrides_for(args, name, run_dir, sft.out, paths["train"])
        load_config(args.config, overrides).validate(world_size=1)  # a bad key fails before any run
        done = os.path.join(run_dir, "summary.json")
        seconds, error = None, None
        if os.path.isfile(done) and json.load(open(done)).get("steps_done") == args.steps:
            print(f"[{k}/{len(names)}] {name}: done before", flush=True)
            seconds = json.load(open(done)).get("wall_seconds")
        else:
            print(f"[{k}/{len(names)}] {name}: {' '.join(OPTIONS[name][1]) or '(no option)'}", flush=True)
            t0 = time.perf_counter()
            try:
                run_local(_train_rank, 1, args.config, overrides, timeout=None)
            except Exception as e:  # noqa: BLE001 - one failing option must not hide the others
                error = " ".join(str(e).split())[-300:] or type(e).__name__
                traceback.print_exc()
            seconds = time.perf_counter() - t0
        rows.append(summarise(name, run_dir, seconds, error))
        print(f"      {rows[-1]['steps']} steps, {seconds or 0:.0f}s" + (f", FAILED: {error}" if error else ""),
              flush=True)

    settings = (f"{args.steps} steps x {args.prompts_per_step} prompts x {args.rollouts} rollouts, max length "
                f"{args.max_len}, seed 0, config {args.config}, warm start {sft.out}"
                + (f", overrides {' '.join(args.overrides)}" if args.overrides else ""))
    md = markdown(rows, command, machine(), settings)
    total = time.perf_counter() - start
    with open(os.path.join(args.out, "rl_options.md"), "w") as f:
        f.write(f"# One short run per RL option (issue 20)\n\n{md}\nTotal: {total / 60:.1f} min\n")
    with open(os.path.join(args.out, "rl_options.json"), "w") as f:
        json.dump({"command": command, "machine": machine(), "settings": settings, "rows": rows,
                   "total_seconds": total}, f, indent=1)
    print(f"\n{md}\n{args.out}/rl_options.md; {total / 60:.1f} min")
    return 0 if not any(r["error"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
