"""`megatron-lead compare`: LEAD and its baselines side by side on the built-in tasks (issue 18).

    megatron-lead compare [--task arith|arith_shortcuts|both] [--quick] [--out runs/compare]
        [--methods default|all|a,b] [--seeds 3] [--steps 30] [--prompts-per-step 12] [--eval-n 4] [key=value ...]

The protocol, the same for every method and fixed before any run (OUT/settings.md says it and why):

1. warm start  per task, the demo's settings (trainer/warmstart.py + `megatron-lead sft`, cached per
               task), one model shared by every run of that task
2. runs        `megatron-lead train` per method x seed from it, with examples/arith/lead.yaml and the
               same steps, prompts, rollouts, learning rate, seeds (seed s: the same data order and
               sampling seeds for every method) and level-stratified batches; each run in its own
               process, in OUT/TASK/runs/METHOD_sSEED; a finished run (summary.json + hf/) is skipped,
               an interrupted one resumes from its last checkpoint
3. evaluation  `megatron-lead eval` of the warm start and every run on the task's held-out split,
               sampled (temperature 1, --eval-n per problem: the primary metric) and greedy (the
               secondary), in OUT/TASK/eval, one engine for all models
4. tables      per method, mean and standard error over seeds, overall and per level (accuracy,
               length, the share of required operations done one per line), against the warm start
               and the correctness-only GRPO control, a difference inside two standard errors worded
               "no measurable difference" (eval/compare_table.py); OUT/TASK/compare.md, .json,
               compare.png, w_eff.png (the efficiency weight over the steps, per method)

Every step is cached, so a second call only does what is missing (e.g. after adding a seed).
`--quick`: the demo's task, four methods, one seed, 12 steps, 20 held-out problems per level: a first look.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import time

HELP = "train LEAD and the baselines from one warm start per built-in task, evaluate (sampled and greedy), tabulate"
TASKS = ("arith", "arith_shortcuts")
# name -> (what it is, lead.* settings, other overrides). B: the global budget of the budget methods.
B_LOW, B_HIGH = 60, 120
METHODS: dict[str, tuple[str, dict, list]] = {
    "lead": ("LEAD: PSI weights, per-prompt mean-of-correct target", {"method": "lead"}, []),
    "grpo": ("GRPO on correctness only (the control)", {"method": "grpo"}, []),
    "static": ("LEAD without PSI: decoupled, static weights 0.5/0.5 (GDPO-style)", {"method": "static"}, []),
    "lead_min_target": ("LEAD with the shortest correct rollout as target (an ablation)",
                        {"method": "lead_min_target"}, []),
    "lead_global_target": (f"LEAD without the adaptive target (one global target {B_HIGH})",
                           {"method": "lead_global_target", "global_target": B_HIGH}, []),
    "shorterbetter": ("ShorterBetter as published: 2 x correct - 0.001 |L - SOL|, GRPO",
                      {"method": "shorterbetter"}, []),
    "kimi": ("Kimi k1.5's length reward added to correctness, GRPO", {"method": "kimi"}, []),
    "drpo_style": ("DRPO's decoupled advantages, sequence-mean loss, PPO clip (docs/LEAD.md)",
                   {"method": "drpo_style"}, ["loss.agg_mode=seq_mean_token_mean"]),
    f"l1_max_b{B_LOW}": (f"L1-Max with one global budget B = {B_LOW}",
                         {"method": "l1_max", "global_target": B_LOW}, []),
    f"l1_max_b{B_HIGH}": (f"L1-Max with one global budget B = {B_HIGH}",
                          {"method": "l1_max", "global_target": B_HIGH}, []),
}
DEFAULT_METHODS = ("lead", "grpo", "static", "shorterbetter", "drpo_style")
"""What the default runs: LEAD, its correctness-only control, its PSI ablation and the two methods
the LEAD paper names. 5 methods x 3 seeds x 2 tasks is what fits the 3-hour budget on the 2-core
box (docs/BENCHMARKS.md: about 20 s of start-up and export and 30 steps of 6-9 s per run);
`--methods all` adds kimi, the L1-Max budgets and the target ablations (twice the time)."""
QUICK = dict(task="arith", methods="lead,grpo,shorterbetter,drpo_style", seeds=1, steps=12, heldout_per_level=20)
"""`--quick`: a first look within 30 minutes on the 2-core box from a fresh clone (docs/BENCHMARKS.md):
the demo's task only, whose warm start (15 minutes there) the demo caches; `--quick --task both`
adds the second task and its warm start (about 50 minutes from nothing)."""
WARM = "warm_start"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=None, choices=TASKS + ("both",),
                   help="built-in task(s) (default both; with --quick, arith)")
    p.add_argument("--quick", action="store_true", help=f"a first look: {QUICK}")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--methods", default=None, help=f"comma-separated, default ({','.join(DEFAULT_METHODS)}) "
                   f"or all ({','.join(METHODS)})")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method: 0 .. N-1 (default 3)")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default 30)")
    p.add_argument("--prompts-per-step", type=int, default=12,
                   help="prompts per RL step (default 12: two per level, level-stratified)")
    p.add_argument("--rollouts", type=int, default=8, help="rollouts per prompt (default 8)")
    p.add_argument("--max-len", type=int, default=400, help="max response tokens, in training and evaluation")
    p.add_argument("--eval-n", type=int, default=4, help="samples per held-out problem at temperature 1 (default 4)")
    p.add_argument("--config", default="examples/arith/lead.yaml", help="RL settings every run starts from")
    p.add_argument("--warmstart", default=None, help="cache folder of the warm start (one task only; "
                   "default: trainer/warmstart.default_folder of the task)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps of the warm start (default: the task's, "
                   "trainer/warmstart.SFT_STEPS)")
    p.add_argument("--init", default=None,
                   help="HF folder to start every run from instead of the task's warm start (no SFT)")
    p.add_argument("--heldout-per-level", type=int, default=None,
                   help="evaluate the first N held-out problems of each level only (default 50; 0: all 533)")
    p.add_argument("--eval-nproc", type=int, default=1, help="ranks of the evaluation (vLLM replicas)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of every run's config")


def resolve_protocol(args) -> argparse.Namespace:
    """The flags with --quick's and the defaults filled in (explicit flags win)."""
    defaults = dict(task="both", methods="default", seeds=3, steps=30, heldout_per_level=50)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    if args.seeds < 1 or args.steps < 1 or args.prompts_per_step < 1 or args.rollouts < 2 or args.max_len < 2 \
            or args.eval_n < 1:
        raise ValueError("need --seeds >= 1, --steps >= 1, --prompts-per-step >= 1, --rollouts >= 2, "
                         "--max-len >= 2, --eval-n >= 1")
    if args.warmstart and args.task == "both":
        raise ValueError("--warmstart names one task's cache: give --task too")
    return args


def _methods(text: str) -> list[str]:
    named = {"all": list(METHODS), "default": list(DEFAULT_METHODS)}
    if text in named:
        return named[text]
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    return names


def _overrides(args, method: str, seed: int, run_dir: str, model: str, train: str) -> list[str]:
    _, lead, extra = METHODS[method]
    half = args.prompts_per_step // 2 if args.prompts_per_step % 2 == 0 else args.prompts_per_step
    micro = 32 if (half * args.rollouts) % 32 == 0 else half * args.rollouts  # the config's 32 when it fits
    return ([f"run_dir={run_dir}", f"seed={seed}", f"model.path={model}", f"data.train_path={train}",
             "data.val_path=null", "validation.every=0", "data.stratify_levels=true", f"ppo.steps={args.steps}",
             f"data.prompts_per_step={args.prompts_per_step}", f"ppo.mini_batch_prompts={half}",
             f"rollout.n={args.rollouts}", f"ppo.micro_batch_size={micro}",
             f"rollout.max_response_len={args.max_len}", f"checkpoint.every={max(1, args.steps // 2)}",
             "checkpoint.keep_last=1", "logging.progress=false"]
            + [f"lead.{k}={v}" for k, v in lead.items()] + extra + list(args.overrides))


def settings_text(args, methods: list[str], tasks: list[str]) -> str:
    """OUT/settings.md: what every run shares and why, written before the first run."""
    lines = [
        "# The comparison's settings (written before the runs)", "",
        f"- tasks: {', '.join(tasks)}; methods: {', '.join(methods)}; seeds 0-{args.seeds - 1}",
        f"- every run: {args.steps} RL steps of {args.prompts_per_step} prompts x {args.rollouts} rollouts "
        f"(level-stratified batches), two PPO updates per step, max {args.max_len} response tokens, "
        f"config {args.config} (lr, temperature 1.0, KL, packing) unchanged for every method"
        + (f", overrides {' '.join(args.overrides)}" if args.overrides else ""),
        *([f"- global budgets B = {B_LOW} (below the required steps from level 3 of arith, from level 4 of "
           f"arith_shortcuts) and {B_HIGH} (binds on level 6 only), against warm starts of about 150 (arith) and "
           "70 (arith_shortcuts) tokens on average, sampled"]
          if any("global_target" in METHODS[m][1] for m in methods) else []),
        f"- evaluation: the first {args.heldout_per_level or 'all'} held-out problems of each level, sampled "
        f"at temperature 1 with {args.eval_n} samples per problem (primary) and greedy (secondary)",
        "", "Why: the same settings for every method, fixed before the runs, so no method is tuned on the "
        "split it is scored on; 30 steps so that PSI's EMA (beta 0.95) moves the weights (LEAD and "
        "`static` then differ); sampled evaluation because greedy decoding hides the slips and jumps that "
        "make long or compressed answers risky; stratified batches so every step sees every level.", "",
        *[f"- `{m}`: {METHODS[m][0]}" for m in methods],
    ]
    return "\n".join(lines) + "\n"


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



def _warm_start(args, task: str, out: str):
    """The task's warm start (cached), or --init; returns (model folder, data paths)."""
    from megatron_lead.launch import run_local
    from megatron_lead.trainer.sft import is_done
    from megatron_lead.trainer.warmstart import default_folder, default_steps, prepare

    sft, paths = prepare(args.warmstart or default_folder(task), args.sft_steps or default_steps(task), task=task)
    if args.init:
        if not os.path.isfile(os.path.join(args.init, "config.json")):
            raise FileNotFoundError(f"--init {args.init}: no HF model there")
        print(f"[{task} 1/4] warm start: --init {args.init}")
        return args.init, paths
    if is_done(sft):
        print(f"[{task} 1/4] warm start: cached in {sft.out}")
    else:
        print(f"[{task} 1/4] warm start: {sft.steps} SFT steps (the demo's settings; 15-18 minutes on the "
              "2-core box of docs/BENCHMARKS.md)", flush=True)
        run_local(_sft_rank, 1, sft, timeout=None)
    return sft.out, paths


def _train_runs(args, task: str, out: str, methods: list[str], model: str, train: str) -> tuple[dict, dict]:
    """Every method x seed of the task, each in its own process; returns ({method: model names},
    {model name: folder}) and records each new run's seconds in OUT/TASK/timings.json."""
    from megatron_lead.launch import run_local
    from megatron_lead.trainer.config import load_config

    runs: dict[str, list[str]] = {WARM: [WARM]}
    folders = {WARM: model}
    timings_path = os.path.join(out, "timings.json")
    timings = json.load(open(timings_path)) if os.path.isfile(timings_path) else {}
    todo = [(m, s) for m in methods for s in range(args.seeds)]
    inputs = inputs_digest(args.config, model)  # hashed once, not once per run
    for k, (method, seed) in enumerate(todo, 1):
        name = f"{method}_s{seed}"
        run_dir = os.path.join(out, "runs", name)
        runs.setdefault(method, []).append(name)
        folders[name] = run_dir
        overrides = _overrides(args, method, seed, run_dir, model, train)
        identity = run_identity(inputs, overrides)
        if run_finished(run_dir, args.steps, identity):
            print(f"[{task} 2/4] run {k}/{len(todo)} {name}: done before")
            continue
        load_config(args.config, overrides).validate(world_size=1)  # a bad setting fails before any run
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, IDENTITY_FILE), "w") as f:
            json.dump({"identity": identity, "overrides": overrides}, f, indent=2)
        t0 = time.perf_counter()
        print(f"[{task} 2/4] run {k}/{len(todo)} {name}: {args.steps} steps of {args.prompts_per_step} prompts x "
              f"{args.rollouts} rollouts", flush=True)
        run_local(_train_rank, 1, args.config, overrides, timeout=None)
        timings[name] = time.perf_counter() - t0
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=1)
        print(f"      {timings[name]:.0f}s", flush=True)
    return runs, folders


def benchmarks(task: str, heldout: str, max_len: int, eval_n: int):
    """(sampled, greedy) evaluations of `task` on `heldout`: the task's preset (eval/benchmarks.py:
    the plain "Q: ...\nA: " prompt the warm start was trained on, no instruction, no chat
    template) under the names TASK_t1 and TASK_greedy. A name that is not a preset would get the
    generic prompt (the paper's instruction, the chat template), which the task's model has never
    seen (the arith_shortcuts warm start then scored 3.5% instead of 66%)."""
    from dataclasses import replace

    from megatron_lead.eval.benchmarks import resolve

    preset = resolve(f"{task}={heldout}", max_len=max_len, top_p=1.0)
    return (replace(preset, name=f"{task}_t1", n=eval_n, temperature=1.0),
            replace(preset, name=f"{task}_greedy", n=1, temperature=0.0))


def _evaluate(args, task: str, out: str, heldout: str, folders: dict) -> dict[str, dict]:
    """Sampled and greedy evaluation of every model (cached); returns {model: model_metrics}."""
    from megatron_lead.data.arith_shortcuts import shape
    from megatron_lead.eval import cli as eval_cli
    from megatron_lead.eval.aes import AESConstants
    from megatron_lead.eval.compare_table import model_metrics
    from megatron_lead.eval.evaluate import EvalConfig, samples_path
    from megatron_lead.trainer.config import load_config

    sampled, greedy = benchmarks(task, heldout, args.max_len, args.eval_n)
    # The runs' own rollout dtype (float32 in examples/arith/lead.yaml): vLLM's "auto" would run a
    # float32 model in 16 bits on CPU, and the warm start would score differently than in the demo.
    dtype = load_config(args.config, []).rollout.dtype
    ecfg = EvalConfig(models=[], benchmarks=[sampled, greedy], out=os.path.join(out, "eval"), base=WARM,
                      dtype=dtype)
    print(f"[{task} 3/4] held-out evaluation of {len(folders)} models ({args.eval_n} samples at T=1, and "
          f"greedy; {heldout})", flush=True)
    rows = eval_cli.evaluate(ecfg, [f"{n}={p}" for n, p in folders.items()], args.eval_nproc)
    eval_cli.report(ecfg.out, rows, ecfg.base, AESConstants())

    def read(model, bench):
        with open(samples_path(ecfg.out, model, bench.name)) as f:
            return [json.loads(x) for x in f]

    return {n: model_metrics(read(n, sampled), read(n, greedy), shape) for n in folders}


def _tabulate(args, task: str, out: str, runs: dict, folders: dict, models: dict, settings: str) -> str:
    from megatron_lead.eval.compare_table import markdown, summarise
    from megatron_lead.eval.plots import compare_plot, weights_plot

    table = summarise(models, runs)
    md = markdown(table)
    methods = [m for m in runs if m != WARM]
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(f"# LEAD vs baselines on `{task}`\n\n{settings}\nMean ± standard error over seeds; "
                f"sampled evaluation (T=1) first, greedy beside it; vs GRPO: the difference and its standard "
                f"error, \"no measurable difference\" inside two standard errors.\n\n{md}\n\n"
                + "\n".join(f"- `{m}`: {METHODS[m][0]}" for m in methods) + "\n")
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"task": task, "table": table, "models": models}, f, indent=1)
    compare_plot(table, os.path.join(out, "compare.png"), f"{task}: {settings.splitlines()[0]}")
    weights_plot({m: [folders[n] for n in runs[m]] for m in methods}, os.path.join(out, "w_eff.png"), task)
    return md


def run(args: argparse.Namespace) -> int:
    args = resolve_protocol(args)
    start = time.perf_counter()
    methods = _methods(args.methods)
    tasks = list(TASKS) if args.task == "both" else [args.task]
    if not os.path.isfile(args.config):
        raise FileNotFoundError(f"--config {args.config} does not exist (run from the repository root)")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.makedirs(args.out, exist_ok=True)
    text = settings_text(args, methods, tasks)
    with open(os.path.join(args.out, "settings.md"), "w") as f:  # before any run
        f.write(text)
    summary = f"{args.steps} steps x {args.prompts_per_step} prompts x {args.rollouts} rollouts, seeds 0-" \
              f"{args.seeds - 1}, eval {args.eval_n} samples at T=1 + greedy"
    for task in tasks:
        out = os.path.join(args.out, task)
        os.makedirs(out, exist_ok=True)
        model, paths = _warm_start(args, task, out)
        runs, folders = _train_runs(args, task, out, methods, model, paths["train"])
        heldout = paths["heldout"]
        if args.heldout_per_level:
            heldout = _heldout_subset(heldout, args.heldout_per_level, out)
        models = _evaluate(args, task, out, heldout, folders)
        md = _tabulate(args, task, out, runs, folders, models, summary)
        print(f"[{task} 4/4] {summary}\n\n{md}\n\n{out}/compare.md, compare.png, w_eff.png", flush=True)
    print(f"compare: {(time.perf_counter() - start) / 60:.1f} min; settings in {args.out}/settings.md")
    return 0
