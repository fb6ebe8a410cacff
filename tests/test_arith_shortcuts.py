"""The second built-in task: worked examples by hand, the risk of a compressed line by the number
of operations it skips, safe jumps over an operation and its inverse, the fixed held-out split, and
the parser of a solution's shape."""

import collections
import json
import random
from pathlib import Path

import pytest

from megatron_lead.data import arith, arith_shortcuts as S

ROOT = Path(__file__).resolve().parents[1]


def test_risk_grows_with_the_operations_a_line_skips():
    assert [round(S.risk(m), 4) for m in range(1, 7)] == [0.0, 0.2, 0.36, 0.488, 0.5904, 0.6723]


def test_effective_ops_by_hand():
    ops = [["+", 4], ["-", 4], ["+", 3], ["-", 2], ["+", 2]]
    assert S.effective_ops(ops, 0, 5) == 1   # (+4 -4) cancels, +3 counts, (-2 +2) cancels
    assert S.effective_ops(ops, 2, 4) == 2
    assert S.effective_ops([["+", 5], ["+", 5]], 0, 2) == 2  # same sign: no cancelling


def test_a_jump_solution_by_hand():
    # 7+3-5+2: with every pair merged: 7+3-5=5, now 5+2. / 5+2=7. / Answer (a single op left).
    p = dict(problem="7+3-5+2=?", answer="7", level=3, start=7, ops=[["+", 3], ["-", 5], ["+", 2]], pair=None)

    class Always:  # merges every pair; never wrong
        def random(self):
            return 0.0 if self.merging else 0.999

        def sample(self, xs, k):
            return xs[:k]

    merge, safe = Always(), Always()
    merge.merging, safe.merging = True, False
    parts = S.solution_parts(p, "jumps", merge, safe)
    assert parts == [("jump", "Jump: 7+3-5=5, now 5+2."), ("step", "5+2=7."), ("answer", "Answer: \\boxed{7}")]
    # A wrong jump: the total is off by one and the solution carries on to a wrong answer.
    wrong = Always()
    wrong.merging = True
    parts = S.solution_parts(p, "jumps", merge, wrong)
    assert parts[0] == ("jump_wrong", "Jump: 7+3-5=6, now 6+2.") and parts[-1] == ("answer", "Answer: \\boxed{8}")
    assert S.solution_parts(p, "direct", merge, safe) == [("direct", "Answer: \\boxed{7}")]


def test_training_rates_follow_the_risk_and_safe_jumps_never_fail():
    train, _ = S.make_splits(train_per_level=3000)
    wrong = collections.defaultdict(list)
    for r in train:
        wrong[(r["level"], r["style"])].append(r["wrong"])
    rate = {k: sum(v) / len(v) for k, v in wrong.items()}
    # A direct answer is wrong more often the more operations it skips (~risk(L), less where a pair cancels).
    direct = [rate[(lv, "direct")] for lv in S.LEVELS]
    assert direct[0] == 0.0 and all(a < b for a, b in zip(direct, direct[1:]))
    # (A random problem may also hold a cancelling pair by chance: its risk is then lower still.)
    assert S.risk(4) - 0.05 < direct[5] < S.risk(6) + 0.03
    # Stepping is the reliable way: no redundant piece (REDUNDANCY 0), so nothing to slip.
    assert all(rate[(lv, "steps")] == 0.0 for lv in S.LEVELS)
    assert not any(line.startswith(("Check:", "So far")) for r in train for line in r["solution"].split("\n"))
    # Every jump over an operation and its inverse is right.
    rng = random.Random(0)
    for _ in range(300):
        level = rng.choice([2, 3, 4, 5, 6])
        p = S.make_problem(rng, level)
        assert len(p["ops"]) == len(p["totals"]) == level and p["answer"] == str(p["totals"][-1])
        if p["pair"] is None:
            continue
        a = p["pair"]
        assert p["ops"][a][1] == p["ops"][a + 1][1] and p["ops"][a][0] != p["ops"][a + 1][0]
        assert S.effective_ops(p["ops"], a, a + 2) == 0
    # Styles and pairs in their shares.
    styles = collections.Counter(r["style"] for r in train)
    for name, share in S.STYLES:
        assert styles[name] / len(train) == pytest.approx(share, abs=0.02)


def test_tokenizer_covers_every_character_and_the_model_fits_it(tmp_path):
    from transformers import AutoTokenizer

    train, _ = S.make_splits(train_per_level=200)
    text = "".join(r["problem"] + r["solution"] for r in train)
    assert set(text) <= set(S.CHARACTERS) and "Jump: " in text
    tok = AutoTokenizer.from_pretrained(S.save_task_tokenizer(tmp_path / "tok"))
    assert tok.decode(tok.encode("Jump: 7+3-5=5, now 5+2.")) == "Jump: 7+3-5=5, now 5+2."
    cfg = S.qwen2_config()
    assert cfg["vocab_size"] == S.VOCAB_SIZE == len(tok) and cfg["eos_token_id"] == tok.eos_token_id
    assert cfg["pad_token_id"] == tok.pad_token_id
    assert arith.qwen2_config()["eos_token_id"] == arith.EOS_ID  # arith's unchanged
    assert (cfg["num_hidden_layers"], arith.qwen2_config()["num_hidden_layers"]) == (S.LAYERS, 4)


def test_heldout_is_fixed_and_independent_of_the_training_split():
    _, small = S.make_splits(train_per_level=10)
    _, big = S.make_splits(train_per_level=500, slip=0.3)
    assert small == big
    path = ROOT / "examples" / "arith_shortcuts" / "heldout.jsonl"
    committed = [json.loads(x) for x in path.read_text().splitlines()]
    assert committed == small
    assert collections.Counter(r["level"] for r in committed) == {1: 33, 2: 100, 3: 100, 4: 100, 5: 100, 6: 100}
    pairs = [r for r in committed if r["pair"] is not None]
    assert 0.2 < len(pairs) / len(committed) < 0.45  # some prompts allow a safe jump, most do not
    # Answers are right, and no held-out problem is in the training split.
    train, _ = S.make_splits(train_per_level=300)
    for r in committed:
        start, ops = arith.parse_problem(r["problem"][3:-4])
        t = start
        for s, d in ops:
            t = t + d if s == "+" else t - d
        assert str(t) == r["answer"]
    assert not {r["problem"] for r in committed} & {r["problem"] for r in train}


def test_shape_of_a_solution():
    q = "Q: 7+3-5+2=?\nA: "
    assert S.shape(q, "7+3=10, now 10-5+2.\nCheck: 10-3=7, 7+3=10.\n10-5=5, now 5+2.\n5+2=7.\nAnswer: \\boxed{7}") \
        == {"ops": 3, "stepped": 3, "jumped": 0, "direct": 0, "steps_share": 1.0}
    assert S.shape(q, "Jump: 7+3-5=5, now 5+2.\n5+2=7.\nAnswer: \\boxed{7}")["steps_share"] == pytest.approx(1 / 3)
    assert S.shape(q, "Answer: \\boxed{7}") == {"ops": 3, "stepped": 0, "jumped": 0, "direct": 3,
                                                "steps_share": 0.0}


def test_the_gate_reads_sample_shapes_and_judges_by_hand():
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import arith_shortcuts_gate as gate

    q1, q2 = "Q: 4+3=?\nA: ", "Q: 7+3-5+2=?\nA: "
    step1, direct1 = "4+3=7.\nAnswer: \\boxed{7}", "Answer: \\boxed{7}"
    steps2 = "7+3=10, now 10-5+2.\n10-5=5, now 5+2.\n5+2=7.\nAnswer: \\boxed{7}"
    jump2 = "Jump: 7+3-5=5, now 5+2.\n5+2=7.\nAnswer: \\boxed{7}"
    shapes = [gate.classify(q1, step1), gate.classify(q1, direct1), gate.classify(q2, jump2)]
    assert shapes == ["steps", "direct", "jumps"]
    samples = ([dict(level=1, problem=q1, response=step1, correct=True)] * 10
               + [dict(level=1, problem=q1, response=direct1, correct=True)] * 4
               + [dict(level=3, problem=q2, response=steps2, correct=True)] * 9
               + [dict(level=3, problem=q2, response=steps2, correct=False)]
               + [dict(level=3, problem=q2, response=jump2, correct=c) for c in (True, False, False, False)]
               + [dict(level=3, problem=q2, response=direct1, correct=c) for c in (True, False, False)])
    t = gate.tabulate(samples)
    assert t["steps_accuracy"] == pytest.approx(19 / 20)
    assert t["levels"][3]["jumps"]["accuracy"] == 0.25 and t["levels"][3]["direct"]["n"] == 3
    assert t["levels"][1]["direct"]["share"] == pytest.approx(4 / 14)
    # Direct answers fall from level 1 (4/4) to 3 (1/3); only one level has jumps: passed.
    assert gate.verdict(t) == []
    # No jump at level 3, and too few right steps: two failures, each named.
    worse = [s for s in samples if s["response"] != jump2]
    worse += [dict(level=3, problem=q2, response=steps2, correct=False)] * 5
    fails = gate.verdict(gate.tabulate(worse))
    assert any("no jump at level 3" in f for f in fails) and any("below 90%" in f for f in fails)
