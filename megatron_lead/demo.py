"""`megatron-lead demo`: the main job. LEAD shortens a model's answers on the built-in task, on a CPU.

    megatron-lead demo [--out runs/demo] [--config examples/arith/lead.yaml] [key=value ...]

1. data       the built-in task (data/arith.py): training split and the fixed held-out split
2. warm start a 1M-parameter Qwen2 trained from scratch through Megatron on the verbose worked
              solutions (`megatron-lead sft`); cached under --warmstart, so a second run skips it
3. RL         `megatron-lead train` with the config (LEAD by default; every output names the
              method that ran, e.g. `lead.method=grpo`), vLLM rollouts; greedy
              evaluation of the held-out split before the first step and after the last
4. report     per-level table of accuracy and mean response length before and after, and
              `report.png`, in the run folder (with metrics.jsonl, TensorBoard, summary.json, hf/)
"""

from __future__ import annotations

import argparse
import json
import os
import time

from megatron_lead.trainer.warmstart import SFT_SETTINGS, prepare

HELP = "the main job: warm-start a small model on the built-in task, then shorten its answers with LEAD"

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--config", default="examples/arith/lead.yaml", help="RL settings (YAML)")
    p.add_argument("--warmstart", default="runs/warmstart", help="cache folder of the warm-started model")
    p.add_argument("--sft-steps", type=int, default=SFT_SETTINGS["steps"], help="SFT optimizer steps")
    p.add_argument("--nproc", type=int, default=1, help="local processes of the RL run")
    p.add_argument("--eval-n", type=int, default=4,
                   help="samples per held-out problem of the sampled evaluation (temperature 1; 0: skip it)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the RL config")


def run(args: argparse.Namespace) -> int:
    from megatron_lead.eval.report import change, plot, table
    from megatron_lead.trainer.cli import run as train_run
    from megatron_lead.trainer.sft import is_done, run_sft

    start = time.perf_counter()
    if not os.path.isfile(args.config):
        raise FileNotFoundError(f"--config {args.config} does not exist (run from the repository root)")
    sft, paths = prepare(args.warmstart, args.sft_steps)
    if is_done(sft):
        print(f"[1/3] warm start: cached in {sft.out}")
    else:
        print(f"[1/3] warm start: {sft.steps} SFT steps through Megatron (about 7 minutes on 2 cores)")
        _in_child(run_sft, sft)  # its own process: Megatron's groups end with it
    sft_seconds = time.perf_counter() - start

    overrides = [f"run_dir={args.out}", f"model.path={sft.out}", f"data.train_path={paths['train']}",
                 f"data.val_path={paths['heldout']}"] + list(args.overrides)
    method = _method(args.config, overrides)
    print(f"[2/3] RL ({method_label(method)}) with vLLM rollouts (held-out evaluation before and after)")
    train_run(argparse.Namespace(config=args.config, overrides=overrides, resume=False, print_config=False,
                                 nproc=args.nproc))

    with open(os.path.join(args.out, "summary.json")) as f:
        summary = json.load(f)
    before, after = summary["before"], summary["after"]
    sampled = _sampled(args, sft.out, paths["heldout"]) if args.eval_n > 0 else None
    png = plot(args.out)
    total = time.perf_counter() - start
    summary["demo"] = {"seconds_total": total, "seconds_warm_start": sft_seconds, "sft": {
        "steps": sft.steps, "cached": sft_seconds < 5}}
    if sampled:
        summary["sampled"] = sampled
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    label = method_label(method)
    if sampled:
        b, a = sampled["before"], sampled["after"]
        print(f"[3/3] held-out split, sampled (temperature 1, {args.eval_n} per problem), before and after RL "
              f"({label}):")
        print(table(b, a))
        print(f"\nsampled: mean length {change(b['mean_length'], a['mean_length']):+.1f}%, accuracy "
              f"{100 * (a['accuracy'] - b['accuracy']):+.1f} points (binomial SE {100 * sampled['se_after']:.1f})\n")
    print(f"{'' if sampled else '[3/3] '}held-out split, greedy decoding, before and after RL ({label}):")
    print(table(before, after))
    print(f"\ngreedy: mean length {change(before['mean_length'], after['mean_length']):+.1f}%, accuracy "
          f"{100 * (after['accuracy'] - before['accuracy']):+.1f} points; plot {png}; "
          f"run folder {args.out}; {total / 60:.1f} min")
    return 0


def _sampled(args, warm: str, heldout: str) -> dict:
    """The warm start and the trained policy on the held-out split, sampled at temperature 1
    (`megatron-lead eval`, args.eval_n per problem, float32 as the runs, with the run's response
    limit and validation.max_prompts): the primary figures."""
    import math

    from megatron_lead.eval import cli as eval_cli
    from megatron_lead.eval.benchmarks import resolve
    from megatron_lead.eval.evaluate import EvalConfig

    import yaml

    with open(os.path.join(args.out, "config.yaml")) as f:  # the run's own limits, as its validation
        run_cfg = yaml.safe_load(f)
    limit = run_cfg["validation"]["max_prompts"]
    if limit:
        from megatron_lead.data import spread

        with open(heldout) as f:
            rows = [r for r in f if r.strip()]
        rows = [rows[i] for i in spread(len(rows), limit)]
        heldout = os.path.join(args.out, "eval_sampled_prompts.jsonl")
        with open(heldout, "w") as f:
            f.writelines(rows)
    bench = resolve(f"arith={heldout}", n=args.eval_n, temperature=1.0, top_p=1.0,
                    max_len=run_cfg["rollout"]["max_response_len"])
    # force: the run folder's hf/ has new weights after every demo (the same path, another model).
    cfg = EvalConfig(models=[], benchmarks=[bench], out=os.path.join(args.out, "eval_sampled"), dtype="float32",
                     force=True)
    rows = {r["model"]: r for r in eval_cli.evaluate(cfg, [f"before={warm}", f"after={os.path.join(args.out, 'hf')}"])}

    def block(r):
        levels = {lv: {**v, "count": v["samples"]} for lv, v in (r.get("levels") or {}).items()}
        return {"accuracy": r["accuracy"], "mean_length": r["mean_length"], "count": r["samples"], "levels": levels}

    a = rows["after"]
    return {"n": args.eval_n, "before": block(rows["before"]), "after": block(a),
            "se_after": math.sqrt(a["accuracy"] * (1 - a["accuracy"]) / a["samples"])}


def method_label(method: str) -> str:
    """How outputs name the method that ran: "LEAD" for lead, else the preset's own name."""
    return "LEAD" if method == "lead" else method


def _method(config: str, overrides: list[str]) -> str:
    from megatron_lead.trainer.config import load_config

    return load_config(config, overrides).lead.method


def _in_child(fn, *args):
    from megatron_lead.launch import run_local

    return run_local(_call, 1, fn, args, timeout=None)[0]


def _call(rank: int, world: int, fn, args):
    fn(*args)
