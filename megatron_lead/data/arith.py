"""The built-in task: chains of +/- on single digits, with verbose worked solutions.

Why this task: LEAD is meant to cut the text a reasoning model does not need while keeping the
text it does (LEAD_SPEC section 11). Shortening shows up only when redundant text carries some
risk of error, and LEAD's edge over a blunt length penalty shows up only when some text is
required, more of it for harder problems. So a worked solution has both kinds:

* Required steps, one per operation, each evaluating the first operation and rewriting what is
  left: `7+3=10, now 10-5+2.` then `10-5=5, now 5+2.` then `5+2=7.`, then
  `Answer: \\boxed{7}`. Each step starts from the previous result and no operand is 0, so
  dropping a step always changes the result: a level-L problem needs L steps. Rewriting the rest
  of the chain makes every step a local computation plus a copy from the line above, which a
  1M-parameter model learns in minutes (finding the k-th operand in the question does not).
* Redundant pieces, inserted after a step (each with probability `redundancy`, so 0-2 per step,
  always in this order): a re-check that undoes the step and redoes it,
  `Check: 10-3=7, 7+3=10.`, and a restatement of what is left, `So far 10-5+2.` Both are
  correct in the data and safe to drop. The next required step copies from the most recent
  statement of the chain, so a model that slips inside a redundant piece (a mis-copied operand,
  a wrong re-computation) carries the slip into the answer, while a model that skips the pieces
  loses nothing. That is the error risk that makes correct rollouts shorter than wrong ones,
  which LEAD's target length then ratchets down.
* Slips, in the training solutions only: each redundant piece states a running total off by one
  with probability `slip` (DEFAULT_SLIP = 0.05), and the solution carries on from it to a wrong
  answer. A model that has learnt the data's arithmetic exactly no longer slips by itself, so
  without this its redundant pieces are harmless padding and LEAD shortens little (measured:
  docs/RESULTS.md, items 11-12); with it the warm start learns a small chance to slip in a
  re-check or restatement (never taken by greedy decoding, taken now and then when sampling),
  as reasoning models' re-checks sometimes talk them out of a right answer.

Running totals stay in 0..19 (no negatives, at most two digits), so the vocabulary is tiny and
a 1M-parameter model can learn the task on a CPU in minutes (measured: 1,200 packed SFT steps of
32 solutions, 7 minutes on 2 cores, reach 98% greedy held-out accuracy, 89% at six steps).

Prompt format: plain text `Q: {problem}\\nA: ` (`prompt_text`), no chat template. The trainer
runs this task with data.use_chat_template=false and data.instruction="", so `PromptEncoder`
sends the JSONL `problem` field verbatim; that field therefore holds the full prompt text. The
SFT text of a row is `problem + solution + EOS` (`sft_text`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LEVELS = (1, 2, 3, 4, 5, 6)
"""Difficulty = number of +/- operations."""
MAX_TOTAL = 19
DIGITS = range(1, 10)
"""Operands; never 0, so that every step changes the total (dropping it changes the answer)."""
DEFAULT_REDUNDANCY = 0.5
DEFAULT_SLIP = 0.05
"""Chance that a redundant piece of a training solution slips (states a total off by one)."""
HELDOUT_FRACTION = 0.25
"""At most this share of a level's distinct problems is held out (level 1 has only 135)."""

CHARACTERS = list("0123456789+-=?.,: \n\\{}") + list("ACQSabcdefhknorswx")
"""Every character of prompts and solutions; id = position in this list."""
PAD, EOS = SPECIALS = ("<|pad|>", "<|endoftext|>")
PAD_ID, EOS_ID = len(CHARACTERS), len(CHARACTERS) + 1
VOCAB_SIZE = len(CHARACTERS) + len(SPECIALS)


def prompt_text(problem: str) -> str:
    """The whole prompt the policy sees (and the JSONL `problem` field): `Q: 7+3=?\\nA: `."""
    return f"Q: {problem}\nA: "


def sft_text(row: dict) -> str:
    """The SFT example of a JSONL row: prompt + worked solution + EOS."""
    return row["problem"] + row["solution"] + EOS


def make_problem(rng: random.Random, level: int) -> dict:
    """A problem with `level` operations. Each op picks + or - with equal odds among those that
    keep the total in 0..MAX_TOTAL, then a digit that does. Returns problem text, answer, level,
    start, ops ([sign, digit] pairs) and the running totals."""
    if level < 1:
        raise ValueError(f"level={level} must be >= 1")
    total = start = rng.randrange(10)
    ops, totals = [], []
    for _ in range(level):
        signs = [s for s in "+-" if (total + 1 <= MAX_TOTAL if s == "+" else total - 1 >= 0)]
        sign = rng.choice(signs)
        digits = [d for d in DIGITS if 0 <= _apply(total, sign, d) <= MAX_TOTAL]
        d = rng.choice(digits)
        total = _apply(total, sign, d)
        ops.append([sign, d])
        totals.append(total)
    text = str(start) + "".join(f"{s}{d}" for s, d in ops) + "=?"
    return dict(problem=text, answer=str(total), level=level, start=start, ops=ops, totals=totals)


def _apply(total: int, sign: str, d: int) -> int:
    return total + d if sign == "+" else total - d


def parse_problem(text: str) -> tuple[int, list[list]]:
    """`7+3-5=?` -> (7, [["+", 3], ["-", 5]]); no eval()."""
    body = text[:-2] if text.endswith("=?") else text
    start, ops, i = int(body[0]), [], 1
    while i < len(body):
        ops.append([body[i], int(body[i + 1])])
        i += 2
    return start, ops


def solution_parts(problem, rng: random.Random, redundancy: float = DEFAULT_REDUNDANCY,
                   slip: float = 0.0, slip_rng: random.Random | None = None) -> list[tuple[str, str]]:
    """The worked solution as (kind, line) pairs, kind in step / check / restate / answer, or
    check_slip / restate_slip for a redundant piece that slipped.

    `problem`: a `make_problem` dict or its text. After each step a re-check and then a
    restatement are added, each with probability `redundancy` (two rng draws per step, always
    made, so the rng advances the same way whatever `redundancy` is). Each redundant piece
    slips with probability `slip` (draws from `slip_rng`, never from `rng`, so slips leave the
    problems of a split unchanged): it states a running total off by one, and every later step
    carries on from that total, so the answer is wrong."""
    if not 0.0 <= redundancy <= 1.0:
        raise ValueError(f"redundancy={redundancy} must be in [0, 1]")
    if not 0.0 <= slip <= 1.0:
        raise ValueError(f"slip={slip} must be in [0, 1]")
    if slip > 0 and slip_rng is None:
        raise ValueError("slip > 0 needs a slip_rng")
    text = problem["problem"] if isinstance(problem, dict) else problem
    total, ops = parse_problem(text)
    parts = []
    for i, (sign, d) in enumerate(ops):
        new = _apply(total, sign, d)
        rest = "".join(f"{s}{x}" for s, x in ops[i + 1:])
        parts.append(("step", f"{total}{sign}{d}={new}" + (f", now {new}{rest}." if rest else ".")))
        inv = "-" if sign == "+" else "+"
        check, restate = rng.random() < redundancy, rng.random() < redundancy
        if check:
            stated = _slipped(new, ops[i + 1:], slip, slip_rng)
            parts.append(("check" if stated == new else "check_slip",
                          f"Check: {new}{inv}{d}={total}, {total}{sign}{d}={stated}."))
            new = stated
        if restate:
            stated = _slipped(new, ops[i + 1:], slip, slip_rng)
            parts.append(("restate" if stated == new else "restate_slip", f"So far {stated}{rest}."))
            new = stated
        total = new
    parts.append(("answer", f"Answer: \\boxed{{{total}}}"))
    return parts


def _slipped(total: int, rest: list, slip: float, slip_rng: random.Random | None) -> int:
    """`total`, or (with probability `slip`) total +- 1 when every later running total stays in
    0..MAX_TOTAL from there (two draws whenever slip > 0, whatever the outcome)."""
    if slip <= 0:
        return total
    happens, up = slip_rng.random() < slip, slip_rng.random() < 0.5
    if not happens:
        return total
    for wrong in ((total + 1, total - 1) if up else (total - 1, total + 1)):
        t, ok = wrong, 0 <= wrong <= MAX_TOTAL
        for sign, d in rest:
            t = _apply(t, sign, d)
            ok = ok and 0 <= t <= MAX_TOTAL
        if ok:
            return wrong
    return total


def worked_solution(problem, rng: random.Random, redundancy: float = DEFAULT_REDUNDANCY,
                    slip: float = 0.0, slip_rng: random.Random | None = None) -> str:
    """The worked solution text: one line per part, the last one `Answer: \\boxed{N}` with no
    newline after it (EOS follows in SFT)."""
    return "\n".join(line for _, line in solution_parts(problem, rng, redundancy, slip, slip_rng))


def count_problems(level: int) -> int:
    """How many distinct problems `make_problem` can produce at `level` (paths of totals)."""
    ways = [1 if t < 10 else 0 for t in range(MAX_TOTAL + 1)]
    for _ in range(level):
        nxt = [0] * (MAX_TOTAL + 1)
        for t, n in enumerate(ways):
            for s in "+-":
                for d in DIGITS:
                    if 0 <= _apply(t, s, d) <= MAX_TOTAL:
                        nxt[_apply(t, s, d)] += n
        ways = nxt
    return sum(ways)


def _row(rid: str, p: dict, rng: random.Random, redundancy: float, slip: float = 0.0,
         slip_rng: random.Random | None = None) -> dict:
    parts = solution_parts(p, rng, redundancy, slip, slip_rng)
    row = {"id": rid, "problem": prompt_text(p["problem"]), "answer": p["answer"], "level": p["level"],
           "solution": "\n".join(line for _, line in parts)}
    if slip_rng is not None:  # training rows: how many redundant pieces slipped (0 = the answer is right)
        row["slips"] = sum(kind.endswith("_slip") for kind, _ in parts)
    return row


def make_splits(train_per_level: int = 2000, heldout_per_level: int = 100, seed: int = 1234,
                redundancy: float = DEFAULT_REDUNDANCY, levels=LEVELS,
                heldout_fraction: float = HELDOUT_FRACTION, slip: float = DEFAULT_SLIP
                ) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows), deterministic for a seed.

    Held-out: per level, distinct problems, at most `heldout_fraction` of the level's problem
    space (level 1 has 135, so it holds 33), drawn from its own rng stream: it does not depend
    on `train_per_level`; its reference solutions never slip (the evaluation reads only the
    problem and the answer). Train: per level, problems not in the held-out split, repeats
    allowed (low levels have few distinct problems), each with its own redundancy draws, and
    slips (probability `slip` per redundant piece) drawn from a third stream, so the problems
    do not depend on `slip`."""
    train, heldout = [], []
    for level in levels:
        rng = random.Random(f"arith/heldout/{seed}/{level}")  # str seeds are stable across runs
        n = min(heldout_per_level, int(count_problems(level) * heldout_fraction))
        seen: set[str] = set()
        while len(seen) < n:
            p = make_problem(rng, level)
            if p["problem"] not in seen:
                seen.add(p["problem"])
                heldout.append(_row(f"heldout-{level}-{len(seen) - 1:04d}", p, rng, redundancy))
        rng = random.Random(f"arith/train/{seed}/{level}")
        slip_rng = random.Random(f"arith/slip/{seed}/{level}")
        count = 0
        while count < train_per_level:
            p = make_problem(rng, level)
            if p["problem"] not in seen:
                train.append(_row(f"train-{level}-{count:05d}", p, rng, redundancy, slip, slip_rng))
                count += 1
    return train, heldout


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_splits(out_dir, train_per_level: int = 2000, heldout_per_level: int = 100,
                 seed: int = 1234, redundancy: float = DEFAULT_REDUNDANCY, **kw) -> dict:
    """Write train.jsonl and heldout.jsonl (lines {"id", "problem", "answer", "level",
    "solution"}, and "slips" in train.jsonl) into `out_dir`; returns {"train": path, "heldout":
    path}. With the defaults the held-out file equals the committed
    examples/arith/heldout.jsonl byte for byte."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = make_splits(train_per_level, heldout_per_level, seed, redundancy, **kw)
    return {"train": _write_jsonl(out / "train.jsonl", train),
            "heldout": _write_jsonl(out / "heldout.jsonl", heldout)}


def save_task_tokenizer(path, characters: list[str] = CHARACTERS) -> str:
    """The task's character tokenizer (`characters`, then <|pad|>, then <|endoftext|> = eos = the
    last id), no chat template; returns `str(path)`."""
    from .char_tokenizer import save_char_tokenizer

    return save_char_tokenizer(path, characters, SPECIALS, None, eos_token=EOS, pad_token=PAD, byte_level=True)


def qwen2_config(vocab_size: int = VOCAB_SIZE, characters: int = len(CHARACTERS)) -> dict:
    """HF config of the warm-start model: a Qwen2 of 990,592 parameters at the 42-token
    vocabulary (4 layers, width 128, MLP 512, tied embeddings; head_dim 32 because vLLM's CPU
    attention kernels need head_dim >= 32). `vocab_size` may be
    padded above the tokenizer's. No BOS token: bos_token_id = eos (as Qwen base models)."""
    pad_id, eos_id = characters, characters + 1  # the two specials follow the characters
    if vocab_size < eos_id + 1:
        raise ValueError(f"vocab_size={vocab_size} is below the tokenizer's {eos_id + 1}")
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=vocab_size,
                hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_act="silu",
                max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=True, use_sliding_window=False, attention_dropout=0.0,
                initializer_range=0.02, use_cache=True, bos_token_id=eos_id,
                eos_token_id=eos_id, pad_token_id=pad_id, torch_dtype="float32")


def length_stats(rows: list[dict]) -> dict:
    """Per level: mean solution length in characters (= tokens) and the redundant share of it."""
    by_level: dict[int, list] = {}
    for r in rows:
        redundant = sum(len(line) + 1 for line in r["solution"].split("\n")
                        if line.startswith(("Check:", "So far")))
        by_level.setdefault(r["level"], []).append((len(r["solution"]), redundant))
    return {lv: {"mean_chars": sum(a for a, _ in v) / len(v),
                 "redundant_fraction": sum(b for _, b in v) / max(1, sum(a for a, _ in v))}
            for lv, v in sorted(by_level.items())}


if __name__ == "__main__":  # python -m megatron_lead.data.arith OUT_DIR: splits + length stats
    import sys

    paths = write_splits(sys.argv[1] if len(sys.argv) > 1 else "runs/arith")
    rows = [json.loads(x) for x in Path(paths["train"]).read_text().splitlines()]
    print(json.dumps(paths), json.dumps(length_stats(rows), indent=1), sep="\n")
