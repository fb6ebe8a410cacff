"""The second built-in task, `arith-shortcuts`: the +/- chains of `arith`, where compressing the
required reasoning is possible and risky, more so on harder problems.

Why a second task: on `arith` every correct answer contains every required step, so the
shortest correct rollout is always safe and shortening never costs accuracy; the failure the
LEAD paper attributes to a target at the shortest correct answer (ShorterBetter's SOL) and to
global budgets, over-compression of hard problems, cannot happen there (issue 18). Here the
training solutions show three ways to write the required work:

* step by step, as `arith` (one operation per line, restating what is left) but without its
  redundant re-checks and restatements (`REDUNDANCY`): never wrong;
* with jumps: two consecutive operations in one line, marked, `Jump: 7+3-5=5, now 5+2.`;
* a direct answer: `Answer: \\boxed{7}` with no step at all.

A line that does m > 1 operations at once is wrong with probability `risk(m) = 1 - (1 -
JUMP_RISK) ** (m - 1)` (0.2 for a jump, 0.59 for a direct answer to six operations), and the
solution carries on from the wrong total to a wrong answer. Operations that cancel do not count:
some problems contain an operation followed by its inverse (`+4-4`), and a jump over such a pair
is always right, as is a direct answer whose other operations are few. So how much of a problem
can be compressed safely varies between problems of one level, and compressing costs more the
more operations it skips: a policy pushed to be short should jump where it is safe and keep the
steps of hard problems. A model trained on these solutions learns that jumps and direct answers
exist and how often they go wrong; the gate (`tools/arith_shortcuts_gate.py`, docs/RESULTS.md)
checks its samples before any RL.

Problems, solution styles, risks and slips come from separate seeded streams, and the held-out
split (its reference solutions step by step, without slips) is fixed before any run: it does not
depend on the training split's size or on the style mix. The prompt format is `arith`'s
(`arith.prompt_text`); the tokenizer and model are arith's with four more characters (`Jump`).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from . import arith

LEVELS = arith.LEVELS
CHARACTERS = arith.CHARACTERS + list("Jump")
"""arith's characters and the four of "Jump": a line that does several operations at once says so
at its start (`Jump: 7+3-5=5, now 5+2.`), so a small model can tell the lines whose results may be
wrong from the step lines, which never are (without the marker the warm start's single steps
picked up the jumps' noise: docs/RESULTS.md, the gate)."""
VOCAB_SIZE = len(CHARACTERS) + len(arith.SPECIALS)
JUMP_RISK = 0.2
"""risk(2): the chance that a line doing two (non-cancelling) operations states a wrong total."""
STYLES = (("steps", 0.6), ("jumps", 0.25), ("direct", 0.15))
"""Solution styles of the training split and their shares."""
JUMP_RATE = 0.6
"""In a `jumps` solution, the chance that each pair of consecutive operations is merged."""
INVERSE_PAIR_RATE = 0.35
"""Share of problems of level >= 2 that contain an operation followed by its inverse."""
HELDOUT_PER_LEVEL = 100
TRAIN_PER_LEVEL = 6000
"""Training rows per level (arith has 2,000): the warm start sees each about twice in its SFT steps.
With 2,000 rows (5-8 epochs) more SFT steps made the sampled step-by-step accuracy worse on the
long held-out problems (docs/RESULTS.md, the gate, attempts 4 and 5): it fits the training
problems rather than the procedure."""
REDUNDANCY = 0.0
"""Chance of each redundant piece (re-check, restatement) after a step; arith's is 0.5. None here:
the 1M-parameter warm start mis-copies the restatements at temperature 1 often enough that its
step-by-step samples of six operations were right only 19% of the time (the gate, attempt 3 in
docs/RESULTS.md), so stepping was not the reliable way the task needs. Jumps and direct answers
are this task's way to shorten; step by step is the long, safe one."""
SLIP = 0.01
"""Slip rate of a redundant piece in a step-by-step solution (arith's is 0.05), when `redundancy`
> 0: low, so that stepping stays the reliable way and the risk this task is about is the jumps'."""


def risk(m: int) -> float:
    """Chance that one line doing m effective (non-cancelling) operations states a wrong total."""
    return 0.0 if m <= 1 else 1.0 - (1.0 - JUMP_RISK) ** (m - 1)


def make_problem(rng: random.Random, level: int) -> dict:
    """An `arith` problem of `level` operations; with probability INVERSE_PAIR_RATE (level >= 2)
    two consecutive operations are d and its inverse (`+4-4`), at a random position. Adds
    `pair` (index of the pair's first operation, or None)."""
    if level < 2 or rng.random() >= INVERSE_PAIR_RATE:
        p = arith.make_problem(rng, level)
        p["pair"] = None
        return p
    if level == 2:  # the pair alone
        start = rng.randrange(10)
        p, at = dict(start=start, ops=[], totals=[]), 0
    else:
        p = arith.make_problem(rng, level - 2)
        at = rng.randrange(level - 1)  # before operation `at` of the level - 2 others (or at the end)
    total = p["start"] if at == 0 else p["totals"][at - 1]
    signs = [s for s in "+-" if any(0 <= arith._apply(total, s, d) <= arith.MAX_TOTAL for d in arith.DIGITS)]
    sign = rng.choice(signs)
    d = rng.choice([d for d in arith.DIGITS if 0 <= arith._apply(total, sign, d) <= arith.MAX_TOTAL])
    inverse = "-" if sign == "+" else "+"
    ops = p["ops"][:at] + [[sign, d], [inverse, d]] + p["ops"][at:]
    totals, t = [], p["start"]
    for s, x in ops:
        t = arith._apply(t, s, x)
        totals.append(t)
    text = str(p["start"]) + "".join(f"{s}{x}" for s, x in ops) + "=?"
    return dict(problem=text, answer=str(t), level=level, start=p["start"], ops=ops, totals=totals, pair=at)


def effective_ops(ops: list, i: int, j: int) -> int:
    """Operations i..j-1 that do not cancel: a +d immediately followed by -d (or -d by +d) counts 0."""
    m, k = 0, i
    while k < j:
        if k + 1 < j and ops[k][1] == ops[k + 1][1] and ops[k][0] != ops[k + 1][0]:
            k += 2
            continue
        m, k = m + 1, k + 1
    return m


def _wrong(total: int, rest: list, rng: random.Random) -> int:
    """A total 1 or 2 away from `total` from which every later running total stays in range."""
    for delta in rng.sample([1, -1, 2, -2], 4):
        t, ok = total + delta, 0 <= total + delta <= arith.MAX_TOTAL
        for s, d in rest:
            t = arith._apply(t, s, d)
            ok = ok and 0 <= t <= arith.MAX_TOTAL
        if ok:
            return total + delta
    return total


def solution_parts(p: dict, style: str, rng: random.Random, risk_rng: random.Random, redundancy: float = 0.0,
                   slip: float = 0.0, slip_rng: random.Random | None = None) -> list[tuple[str, str]]:
    """(kind, line) pairs: step / jump / jump_wrong / direct / direct_wrong / the redundant kinds of
    arith.solution_parts / answer. `rng` draws the merges, `risk_rng` whether a multi-operation
    line is wrong (and by how much), so the style and the outcome are drawn apart."""
    ops, total = p["ops"], p["start"]
    if style == "direct":
        right = int(p["answer"])
        wrong = risk_rng.random() < risk(effective_ops(ops, 0, len(ops)))
        value = _wrong(right, [], risk_rng) if wrong else right
        return [("direct_wrong" if value != right else "direct", f"Answer: \\boxed{{{value}}}")]
    if style == "steps":
        return arith.solution_parts(p, rng, redundancy, slip, slip_rng)
    parts, i = [], 0
    while i < len(ops):
        j = i + 2 if i + 1 < len(ops) and rng.random() < JUMP_RATE else i + 1
        right = total
        for s, d in ops[i:j]:
            right = arith._apply(right, s, d)
        rest = ops[j:]
        new, kind = right, "step"
        if j - i > 1:
            wrong = risk_rng.random() < risk(effective_ops(ops, i, j))
            new = _wrong(right, rest, risk_rng) if wrong else right
            kind = "jump_wrong" if new != right else "jump"
        text = ("Jump: " if j - i > 1 else "") + f"{total}" + "".join(f"{s}{d}" for s, d in ops[i:j]) + f"={new}"
        tail = "".join(f"{s}{d}" for s, d in rest)
        parts.append((kind, text + (f", now {new}{tail}." if tail else ".")))
        total, i = new, j
    parts.append(("answer", f"Answer: \\boxed{{{total}}}"))
    return parts


def _style(rng: random.Random) -> str:
    x, acc = rng.random(), 0.0
    for name, share in STYLES:
        acc += share
        if x < acc:
            return name
    return STYLES[-1][0]


def make_splits(train_per_level: int = TRAIN_PER_LEVEL, heldout_per_level: int = HELDOUT_PER_LEVEL, seed: int = 4321,
                redundancy: float = REDUNDANCY, slip: float = SLIP) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows), deterministic for a seed; each from streams of its own (the
    held-out problems do not depend on the training split; a row's style, merges, risks and slips
    are drawn from four more streams). Rows: {"id", "problem", "answer", "level", "solution",
    "pair"} and, in train, "style" and "wrong" (the solution's answer is not the right one)."""
    train, heldout = [], []
    for level in LEVELS:
        rng = random.Random(f"shortcuts/heldout/{seed}/{level}")
        n = min(heldout_per_level, int(arith.count_problems(level) * arith.HELDOUT_FRACTION))
        seen: set[str] = set()
        while len(seen) < n:
            p = make_problem(rng, level)
            if p["problem"] not in seen:
                seen.add(p["problem"])
                parts = arith.solution_parts(p, rng, redundancy)
                heldout.append(_row(f"heldout-{level}-{len(seen) - 1:04d}", p, parts))
        streams = {k: random.Random(f"shortcuts/{k}/{seed}/{level}") for k in ("train", "style", "risk", "slip")}
        count = 0
        while count < train_per_level:
            p = make_problem(streams["train"], level)
            if p["problem"] in seen:
                continue
            style = _style(streams["style"])
            parts = solution_parts(p, style, streams["train"], streams["risk"], redundancy, slip, streams["slip"])
            row = _row(f"train-{level}-{count:05d}", p, parts)
            row.update(style=style, wrong=_boxed(row["solution"]) != p["answer"])
            train.append(row)
            count += 1
    return train, heldout


def _row(rid: str, p: dict, parts) -> dict:
    return {"id": rid, "problem": arith.prompt_text(p["problem"]), "answer": p["answer"], "level": p["level"],
            "solution": "\n".join(line for _, line in parts), "pair": p["pair"]}


_BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def _boxed(text: str) -> str | None:
    found = _BOXED.findall(text)
    return found[-1] if found else None


_LINE = re.compile(r"^(?:Jump: )?(\d+)((?:[+-]\d)+)=(-?\d+)")


def shape(problem_text: str, response: str) -> dict:
    """How a (model's) solution did the problem's operations: {"ops", "stepped" (operations done
    one per line), "jumped" (done inside a multi-operation line), "direct" (answered with no
    computing line), "steps_share" = stepped / ops}. Re-checks and restatements are ignored."""
    _, ops = arith.parse_problem(problem_text[3:].split("\n")[0] if problem_text.startswith("Q: ") else problem_text)
    stepped = jumped = 0
    for line in response.split("\n"):
        m = _LINE.match(line.strip())
        if m:
            n = len(m.group(2)) // 2
            stepped, jumped = stepped + (n == 1), jumped + (n if n > 1 else 0)
    done = min(stepped + jumped, len(ops))
    direct = len(ops) - done if _boxed(response) is not None else 0
    return {"ops": len(ops), "stepped": min(stepped, len(ops)), "jumped": min(jumped, len(ops)), "direct": direct,
            "steps_share": min(stepped, len(ops)) / len(ops)}


def save_task_tokenizer(path) -> str:
    """arith's character tokenizer with this task's characters (CHARACTERS, then the specials)."""
    return arith.save_task_tokenizer(path, CHARACTERS)


LAYERS = 6
"""Transformer layers of this task's model (arith's has 4). With 4, the warm start's sampled
step-by-step answers to six operations were right only 43% of the time, almost all wrong in the
first line's copy of what is left (`4+8+5-5-3+7-6` -> `12+5-5+7+7-6`, around repeated digits and
cancelling pairs): docs/RESULTS.md, the gate, attempt 6."""


def qwen2_config() -> dict:
    """arith's warm-start model at this task's vocabulary, `LAYERS` deep."""
    return {**arith.qwen2_config(VOCAB_SIZE, len(CHARACTERS)), "num_hidden_layers": LAYERS}


def write_splits(out_dir, **kw) -> dict:
    """train.jsonl and heldout.jsonl in `out_dir`; returns {"train": path, "heldout": path}. With the
    defaults the held-out file equals the committed examples/arith_shortcuts/heldout.jsonl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = make_splits(**kw)
    paths = {}
    for name, rows in (("train", train), ("heldout", heldout)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = str(out / f"{name}.jsonl")
    return paths
