"""`megatron-lead compare`: LEAD and its baselines side by side on the built-in task.

    megatron-lead compare [--out runs/compare] [--methods all] [--seeds 3] [--steps 8]
        [--prompts-per-step 16] [--max-len 400] [--warmstart runs/warmstart] [key=value ...]

1. warm start  the demo's (trainer.warmstart.prepare + `megatron-lead sft`, cached in --warmstart): one model,
               shared by every run
2. runs        `megatron-lead train` per method x seed from it, with examples/arith/lead.yaml and
               the same steps, prompts, rollouts, learning rate and seeds (seed s: the same data
               order and sampling seeds for every method); each run in its own process, in
               OUT/runs/METHOD_sSEED; a finished run (summary.json + hf/) is skipped, an
               interrupted one resumes from its last checkpoint
3. evaluation  `megatron-lead eval` of the warm start and every run on the held-out split (the
               `arith` preset: greedy, as the demo) in OUT/eval, one engine for all models
4. table       per method, mean and std over seeds: accuracy, mean length, accuracy and length on
               the easiest and hardest level, tokens per correct answer, AES against the warm
               start; OUT/compare.md, compare.csv, compare.json, compare.png

Every step is cached, so a second call only does what is missing (e.g. after adding a seed).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import statistics
import time

HELP = "train LEAD and the baselines from one warm start on the built-in task, evaluate and tabulate them"

# name -> (what it is, lead.* overrides). Budget-style targets use B = --max-len / 2 (set in
# _overrides). The length weights of grpo_combined are 1 - static_w_corr.
METHODS: dict[str, tuple[str, dict]] = {
    "lead": ("LEAD: PSI weights, per-prompt adaptive target", {"method": "lead"}),
    "grpo": ("GRPO on correctness only (the control)", {"method": "grpo"}),
    "grpo_combined_w0.1": ("GRPO, combined reward, length weight 0.1",
                           {"method": "grpo_combined", "static_w_corr": 0.9}),
    "grpo_combined_w0.3": ("GRPO, combined reward, length weight 0.3",
                           {"method": "grpo_combined", "static_w_corr": 0.7}),
    "static": ("decoupled, static weights 0.5/0.5 (GDPO-style; = LEAD without PSI)", {"method": "static"}),
    "lead_min_target": ("LEAD with the shortest correct rollout as target (an ablation)",
                        {"method": "lead_min_target"}),
    "shorterbetter": ("ShorterBetter: 2 x correct - 0.001 |L - SOL|, one group normalisation",
                      {"method": "shorterbetter"}),
    "kimi": ("Kimi k1.5 length reward added to correctness, one group normalisation", {"method": "kimi"}),
    "budget": ("one global length budget B", {"method": "budget"}),
    "lead_global_target": ("LEAD without the adaptive target (global target B)", {"method": "lead_global_target"}),
    "drpo_style": ("DRPO's decoupled advantages inside the PPO loss", {"method": "drpo_style"}),
}
WARM = "warm_start"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--methods", default="all", help=f"comma-separated, or all: {','.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method: 0 .. N-1 (default 3)")
    p.add_argument("--steps", type=int, default=8, help="RL steps per run (default 8)")
    p.add_argument("--prompts-per-step", type=int, default=16, help="prompts per RL step (default 16)")
    p.add_argument("--rollouts", type=int, default=8, help="rollouts per prompt (default 8)")
    p.add_argument("--max-len", type=int, default=400, help="max response tokens, in training and evaluation")
    p.add_argument("--config", default="examples/arith/lead.yaml", help="RL settings every run starts from")
    p.add_argument("--warmstart", default="runs/warmstart", help="cache folder of the warm start (the demo's)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps of the warm start (default: the demo's)")
    p.add_argument("--init", default=None,
                   help="HF folder to start every run from instead of the demo's warm start (no SFT); "
                        "it must read the built-in task's prompts (e.g. a copy of runs/warmstart/model)")
    p.add_argument("--heldout-per-level", type=int, default=0,
                   help="evaluate the first N held-out problems of each level only (0: all 533)")
    p.add_argument("--eval-nproc", type=int, default=1, help="ranks of the evaluation (vLLM replicas)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of every run's config")


def _methods(text: str) -> list[str]:
    names = list(METHODS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    return names


def _overrides(args, method: str, seed: int, run_dir: str, model: str, train: str) -> list[str]:
    lead = {**METHODS[method][1], "global_target": args.max_len // 2}
    half = args.prompts_per_step // 2 if args.prompts_per_step % 2 == 0 else args.prompts_per_step
    micro = 32 if (half * args.rollouts) % 32 == 0 else half * args.rollouts  # the config's 32 when it fits
    return ([f"run_dir={run_dir}", f"seed={seed}", f"model.path={model}", f"data.train_path={train}",
             "data.val_path=null", "validation.every=0", f"ppo.steps={args.steps}",
             f"data.prompts_per_step={args.prompts_per_step}", f"ppo.mini_batch_prompts={half}",
             f"rollout.n={args.rollouts}", f"ppo.micro_batch_size={micro}",
             f"rollout.max_response_len={args.max_len}", f"checkpoint.every={max(1, args.steps // 2)}",
             "checkpoint.keep_last=1", "logging.progress=false"]
            + [f"lead.{k}={v}" for k, v in lead.items()] + list(args.overrides))


IDENTITY_FILE = "compare_run.json"


def inputs_digest(config: str, model: str) -> str:
    """SHA-256 over the config file and the warm start's weights: what every run shares."""
    h = hashlib.sha256()
    for path in [config] + sorted(glob.glob(os.path.join(model, "*.safetensors"))):
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def run_identity(inputs: str, overrides: list[str]) -> str:
    """A hash of what a run depends on: `inputs` (`inputs_digest`) and its overrides."""
    return hashlib.sha256((inputs + json.dumps(overrides)).encode()).hexdigest()


def run_finished(run_dir: str, steps: int, identity: str) -> bool:
    """True for a run folder that finished `steps` steps of exactly this run. A folder of another
    run (other settings, another warm start) is deleted, so it is neither skipped nor resumed."""
    try:
        with open(os.path.join(run_dir, IDENTITY_FILE)) as f:
            same = json.load(f).get("identity") == identity
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(run_dir, ignore_errors=True)
        return False
    path = os.path.join(run_dir, "summary.json")
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(run_dir, "hf", "config.json"))):
        return False
    with open(path) as f:
        return json.load(f).get("steps_done") == steps


def _train_rank(rank: int, world: int, config: str, overrides: list[str]) -> dict:
    from megatron_lead.trainer.config import load_config
    from megatron_lead.trainer.loop import train

    return train(load_config(config, overrides), resume=True)


def _sft_rank(rank: int, world: int, sft) -> None:
    from megatron_lead.trainer.sft import run_sft

    run_sft(sft)


def _heldout_subset(path: str, per_level: int, out: str) -> str:
    """The first `per_level` problems of each level of the held-out file (for quick runs)."""
    from collections import Counter

    kept, seen = [], Counter()
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if seen[row.get("level")] < per_level:
                seen[row.get("level")] += 1
                kept.append(line)
    sub = os.path.join(out, f"heldout_{per_level}_per_level.jsonl")
    with open(sub, "w") as f:
        f.writelines(kept)
    return sub


def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise_methods(rows: dict[str, dict], runs: dict[str, list[str]], constants) -> list[dict]:
    """One line per method (and the warm start): mean and std over its seeds of every metric.

    rows: eval result row by model name; runs: method -> model names of its seeds (WARM included)."""
    from megatron_lead.eval.aes import aes, level_key

    base = rows[WARM]
    levels = sorted(base.get("levels") or {}, key=level_key)
    easy, hard = (levels[0], levels[-1]) if levels else (None, None)
    table = []
    for method, models in runs.items():
        per_seed = []
        for name in models:
            r = rows[name]
            lv = r.get("levels") or {}
            per_seed.append({
                "accuracy": r["accuracy"], "mean_length": r["mean_length"],
                "tokens_per_correct": r["tokens_per_correct"],
                "easy_accuracy": lv.get(easy, {}).get("accuracy"), "easy_length": lv.get(easy, {}).get("mean_length"),
                "hard_accuracy": lv.get(hard, {}).get("accuracy"), "hard_length": lv.get(hard, {}).get("mean_length"),
                "aes": aes(r["accuracy"], r["mean_length"], base["accuracy"], base["mean_length"], constants)})
        line = {"method": method, "seeds": len(models), "easy_level": easy, "hard_level": hard}
        for key in per_seed[0]:
            line[key], line[f"{key}_std"] = _mean_std([s[key] for s in per_seed])
        table.append(line)
    return table


def markdown(table: list[dict]) -> str:
    def cell(r, key, pct=False, fmt="{:.1f}"):
        m, s = r.get(key), r.get(f"{key}_std")
        if m is None:
            return "-"
        scale = 100 if pct else 1
        text = (fmt.format(scale * m)) + ("%" if pct else "")
        spread = fmt.replace("+", "").format(scale * s) if s else ""  # a spread has no sign
        return text + (f" ± {spread}" if s and r["seeds"] > 1 else "")

    easy, hard = (table[0]["easy_level"], table[0]["hard_level"]) if table else ("", "")
    head = ["method", "seeds", "accuracy", "mean length", f"acc. level {easy}", f"len. level {easy}",
            f"acc. level {hard}", f"len. level {hard}", "tokens / correct", "AES vs warm start"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        lines.append("| " + " | ".join([
            r["method"], str(r["seeds"]), cell(r, "accuracy", True), cell(r, "mean_length"),
            cell(r, "easy_accuracy", True), cell(r, "easy_length"), cell(r, "hard_accuracy", True),
            cell(r, "hard_length"), cell(r, "tokens_per_correct"), cell(r, "aes", fmt="{:+.3f}")]) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from megatron_lead.trainer.warmstart import SFT_SETTINGS, prepare
    from megatron_lead.eval import cli as eval_cli
    from megatron_lead.eval.aes import AESConstants
    from megatron_lead.eval.benchmarks import resolve
    from megatron_lead.eval.evaluate import EvalConfig
    from megatron_lead.eval.plots import compare_plot
    from megatron_lead.launch import run_local
    from megatron_lead.trainer.config import load_config
    from megatron_lead.trainer.sft import is_done

    start = time.perf_counter()
    methods = _methods(args.methods)
    if args.seeds < 1 or args.steps < 1 or args.prompts_per_step < 1 or args.rollouts < 2 or args.max_len < 2:
        raise ValueError("need --seeds >= 1, --steps >= 1, --prompts-per-step >= 1, --rollouts >= 2, --max-len >= 2")
    if not os.path.isfile(args.config):
        raise FileNotFoundError(f"--config {args.config} does not exist (run from the repository root)")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.makedirs(args.out, exist_ok=True)

    # 1. The shared warm start.
    sft, paths = prepare(args.warmstart, args.sft_steps or SFT_SETTINGS["steps"])
    if args.init:
        if not os.path.isfile(os.path.join(args.init, "config.json")):
            raise FileNotFoundError(f"--init {args.init}: no HF model there")
        sft.out = args.init
        print(f"[1/4] warm start: --init {args.init}")
    elif is_done(sft):
        print(f"[1/4] warm start: cached in {sft.out}")
    else:
        print(f"[1/4] warm start: {sft.steps} SFT steps (the demo's; about 7 minutes on 2 cores)")
        run_local(_sft_rank, 1, sft, timeout=None)

    # 2. One training run per method and seed, each in its own process.
    runs: dict[str, list[str]] = {WARM: [WARM]}
    specs = [f"{WARM}={sft.out}"]
    timings = {}
    todo = [(m, s) for m in methods for s in range(args.seeds)]
    inputs = inputs_digest(args.config, sft.out)  # hashed once, not once per run
    for k, (method, seed) in enumerate(todo, 1):
        name = f"{method}_s{seed}"
        run_dir = os.path.join(args.out, "runs", name)
        runs.setdefault(method, []).append(name)
        specs.append(f"{name}={run_dir}")
        overrides = _overrides(args, method, seed, run_dir, sft.out, paths["train"])
        identity = run_identity(inputs, overrides)
        if run_finished(run_dir, args.steps, identity):
            print(f"[2/4] run {k}/{len(todo)} {name}: done before")
            continue
        load_config(args.config, overrides).validate(world_size=1)  # a bad setting fails before any run
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, IDENTITY_FILE), "w") as f:
            json.dump({"identity": identity, "overrides": overrides}, f, indent=2)
        t0 = time.perf_counter()
        print(f"[2/4] run {k}/{len(todo)} {name}: {args.steps} steps of {args.prompts_per_step} prompts x "
              f"{args.rollouts} rollouts", flush=True)
        run_local(_train_rank, 1, args.config, overrides, timeout=None)
        timings[name] = time.perf_counter() - t0
        print(f"      {timings[name]:.0f}s", flush=True)

    # 3. Held-out evaluation of the warm start and every run (one engine; finished pairs skipped).
    heldout = paths["heldout"]
    if args.heldout_per_level:
        heldout = _heldout_subset(heldout, args.heldout_per_level, args.out)
    bench = resolve(f"arith={heldout}", max_len=args.max_len)
    # The runs' own rollout dtype (float32 in examples/arith/lead.yaml): vLLM's "auto" would run a
    # float32 model in 16 bits on CPU, and the warm start would score differently than in the demo.
    dtype = load_config(args.config, []).rollout.dtype
    ecfg = EvalConfig(models=[], benchmarks=[bench], out=os.path.join(args.out, "eval"), base=WARM, dtype=dtype)
    t0 = time.perf_counter()
    print(f"[3/4] held-out evaluation of {len(specs)} models (greedy, {bench.path})", flush=True)
    rows = eval_cli.evaluate(ecfg, specs, args.eval_nproc)
    eval_seconds = time.perf_counter() - t0
    eval_cli.report(ecfg.out, rows, ecfg.base, ecfg.aes)

    # 4. The table over seeds and the plot.
    by_name = {r["model"]: r for r in rows if r["benchmark"] == bench.name}
    table = summarise_methods(by_name, runs, AESConstants())
    md = markdown(table)
    settings = (f"{args.steps} steps x {args.prompts_per_step} prompts x {args.rollouts} rollouts, max length "
                f"{args.max_len}, seeds 0-{args.seeds - 1}, config {args.config}"
                + (f", overrides {' '.join(args.overrides)}" if args.overrides else ""))
    total = time.perf_counter() - start
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(f"# LEAD vs baselines on the built-in task\n\n{settings}; held-out split greedy "
                f"({bench.path}); mean ± std over seeds; AES (1, 3, 5) against the warm start.\n\n{md}\n\n"
                + "\n".join(f"- `{m}`: {METHODS[m][0]}" for m in methods) + "\n")
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"settings": settings, "table": table, "run_seconds": timings, "eval_seconds": eval_seconds,
                   "total_seconds": total}, f, indent=1)
    with open(os.path.join(args.out, "compare.csv"), "w") as f:
        keys = list(table[0])
        f.write(",".join(keys) + "\n")
        f.writelines(",".join("" if r[k] is None else str(r[k]) for k in keys) + "\n" for r in table)
    png = compare_plot(table, os.path.join(args.out, "compare.png"), settings)
    print(f"[4/4] {settings}\n\n{md}\n\n{args.out}/compare.md, compare.csv, {png}; {total / 60:.1f} min")
    return 0
