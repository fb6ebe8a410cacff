"""The built-in arithmetic task (megatron_lead/data/arith.py) and its character tokenizer.

What must hold for the task to show LEAD honestly (LEAD_SPEC section 11): answers are right
and checkable without eval(), every required step is needed (dropping one changes the result),
redundant pieces are optional and state the running total that the next step copies, harder
levels are longer, and the held-out split is fixed (the committed file is reproduced exactly).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from megatron_lead.data import arith
from megatron_lead.data.arith import (CHARACTERS, EOS, LEVELS, SPECIALS, VOCAB_SIZE, make_problem,
                                      make_splits, prompt_text, qwen2_config, save_task_tokenizer,
                                      sft_text, solution_parts, worked_solution, write_splits)

COMMITTED = Path(__file__).resolve().parents[1] / "examples" / "arith" / "heldout.jsonl"
EQ = re.compile(r"(\d+)([+-])(\d)=(\d+)")


def fold(text: str) -> int:
    """Evaluate `7+3-5=?` by folding the ops left to right (no eval)."""
    body = text.removesuffix("=?")
    total = int(body[0])
    for sign, digit in zip(body[1::2], body[2::2]):
        total = total + int(digit) if sign == "+" else total - int(digit)
    return total


def boxed(text: str) -> str | None:
    try:  # the trainer's grader extraction when the rewards package is there
        from megatron_lead.rewards import extract_last_boxed
    except ImportError:
        m = re.findall(r"\\boxed\{([^{}]*)\}", text)
        return m[-1] if m else None
    return extract_last_boxed(text)


@pytest.fixture(scope="module")
def splits():
    return make_splits(train_per_level=300)


def test_fixed_rng_gives_hand_checked_problems():
    rng = random.Random(2024)
    p3, p5 = make_problem(rng, 3), make_problem(rng, 5)
    assert p3["problem"] == "7+5+6-5=?" and p3["answer"] == "13"      # 12, 18, 13
    assert p5["problem"] == "8+8-7+5-9+4=?" and p5["answer"] == "9"   # 16, 9, 14, 5, 9
    assert p5["totals"] == [16, 9, 14, 5, 9] and p5["level"] == 5
    assert fold(p3["problem"]) == 13 and fold(p5["problem"]) == 9


def test_hand_written_solution_with_every_redundant_piece():
    want = ("7+3=10, now 10-5+2.\nCheck: 10-3=7, 7+3=10.\nSo far 10-5+2.\n"
            "10-5=5, now 5+2.\nCheck: 5+5=10, 10-5=5.\nSo far 5+2.\n"
            "5+2=7.\nCheck: 7-2=5, 5+2=7.\nSo far 7.\n"
            "Answer: \\boxed{7}")
    assert worked_solution("7+3-5+2=?", random.Random(0), 1.0) == want
    bare = "7+3=10, now 10-5+2.\n10-5=5, now 5+2.\n5+2=7.\nAnswer: \\boxed{7}"
    assert worked_solution("7+3-5+2=?", random.Random(0), 0.0) == bare
    assert prompt_text("7+3-5+2=?") == "Q: 7+3-5+2=?\nA: "


@pytest.mark.parametrize("level", LEVELS)
def test_answers_totals_and_every_equation_are_right(level):
    rng = random.Random(level)
    for _ in range(200):
        p = make_problem(rng, level)
        assert len(p["ops"]) == level and p["answer"] == str(fold(p["problem"]))
        assert all(0 <= t <= 19 for t in p["totals"]) and all(1 <= d <= 9 for _, d in p["ops"])
        sol = worked_solution(p, rng, 0.7)
        for a, sign, d, c in EQ.findall(sol):
            assert int(c) == (int(a) + int(d) if sign == "+" else int(a) - int(d)), sol
        assert boxed(sol) == p["answer"]


@pytest.mark.parametrize("slip", [0.0, 0.3])
def test_each_step_starts_from_the_last_stated_chain(slip):
    """The copy rule that makes a slip in a redundant piece reach the answer: every step takes
    the first operation of the most recently stated chain (a slipped total included) and states
    what is left; every equation is right from the total it starts at."""
    rng, slip_rng = random.Random(5), random.Random(6)
    slipped_rows = 0
    for level in LEVELS:
        for _ in range(100):
            p = make_problem(rng, level)
            stated, steps, off = p["problem"][:-2], 0, 0  # the chain as last written; slips so far
            for kind, line in solution_parts(p, rng, 0.5, slip, slip_rng):
                if kind == "step":
                    m = re.fullmatch(r"(\d+)([+-])(\d)=(\d+)(?:, now ([\d+-]+))?\.", line)
                    a, sign, d, c, rest = m.groups()
                    assert stated.startswith(f"{a}{sign}{d}") and not stated[len(a + sign + d):][:1].isdigit()
                    assert [sign, int(d)] == p["ops"][steps] and int(c) == p["totals"][steps] + off
                    assert int(c) == (int(a) + int(d) if sign == "+" else int(a) - int(d))
                    assert (rest or c) == c + stated[len(a + sign + d):]
                    stated, steps = rest or c, steps + 1
                elif kind in ("check", "check_slip"):
                    total = int(re.match(r"\d+", stated).group())
                    got = int(line.rstrip(".").rsplit("=", 1)[1])
                    assert (got == total) == (kind == "check") and abs(got - total) <= 1, line
                    stated, off = str(got) + stated[len(str(total)):], off + got - total
                elif kind in ("restate", "restate_slip"):
                    body = line.removeprefix("So far ").rstrip(".")
                    total = int(re.match(r"\d+", stated).group())
                    got = int(re.match(r"\d+", body).group())
                    assert body[len(str(got)):] == stated[len(str(total)):]  # the rest is copied
                    assert (got == total) == (kind == "restate") and abs(got - total) <= 1, line
                    stated, off = body, off + got - total
                else:
                    assert line == f"Answer: \\boxed{{{stated}}}" and int(stated) == int(p["answer"]) + off
            assert steps == level
            slipped_rows += off != 0
    assert (slipped_rows > 0) == (slip > 0)


def test_slips_only_in_redundant_pieces_and_only_in_training_rows(splits):
    """A slip states a total off by one inside a re-check or a restatement, never in a required
    step; about `slip` of the redundant pieces slip; the held-out reference solutions never do,
    and slips do not change which problems a split holds."""
    train, heldout = splits
    pieces = sum(r["solution"].count("Check:") + r["solution"].count("So far") for r in train)
    slipped = [r for r in train if r["slips"]]
    assert 0.03 < sum(r["slips"] for r in train) / pieces < 0.07  # DEFAULT_SLIP = 0.05
    assert all(boxed(r["solution"]) != r["answer"] for r in slipped if r["slips"] == 1)
    assert all(boxed(r["solution"]) == r["answer"] for r in train if not r["slips"])
    assert all(boxed(r["solution"]) == r["answer"] and "slips" not in r for r in heldout)
    clean, clean_heldout = make_splits(train_per_level=300, slip=0.0)
    assert clean_heldout == heldout and [r["problem"] for r in clean] == [r["problem"] for r in train]
    assert all(r["slips"] == 0 for r in clean)
    with pytest.raises(ValueError):
        worked_solution("1+1=?", random.Random(0), 0.5, slip=0.5)  # no slip_rng
    with pytest.raises(ValueError):
        worked_solution("1+1=?", random.Random(0), 0.5, slip=1.5, slip_rng=random.Random(0))


def test_hand_written_slip():
    """redundancy 1, slip 1, slip_rng Random(0), whose draws are 0.844, 0.758, 0.421, 0.259,
    0.511, 0.405, 0.784, 0.303 (happens, up) per piece: the check goes down (10 -> 9), the
    restatement up from 9 (back to 10, a slip that cancels), then 5 -> 6 -> 7."""
    parts = solution_parts("7+3-5=?", random.Random(0), 1.0, slip=1.0, slip_rng=random.Random(0))
    assert parts == [("step", "7+3=10, now 10-5."), ("check_slip", "Check: 10-3=7, 7+3=9."),
                     ("restate_slip", "So far 10-5."), ("step", "10-5=5."),
                     ("check_slip", "Check: 5+5=10, 10-5=6."), ("restate_slip", "So far 7."),
                     ("answer", "Answer: \\boxed{7}")]
    # A slip is refused when a later total would leave 0..19: from 1, "1-1" allows only up.
    parts = solution_parts("0+1-1=?", random.Random(0), 1.0, slip=1.0, slip_rng=random.Random(0))
    assert parts[1] == ("check_slip", "Check: 1-1=0, 0+1=2.")


def test_dropping_any_required_step_changes_the_result():
    rng = random.Random(11)
    for level in LEVELS:
        for _ in range(100):
            p = make_problem(rng, level)
            steps = [line for kind, line in solution_parts(p, rng, 0.5) if kind == "step"]
            for i in range(level):
                kept = steps[:i] + steps[i + 1:]
                total = p["start"]  # re-run the chain of the kept steps' operations
                for s in kept:
                    _, sign, d, _ = EQ.match(s).groups()
                    total = total + int(d) if sign == "+" else total - int(d)
                assert total != int(p["answer"])


def test_redundancy_zero_gives_only_required_steps_and_one_gives_all_pieces():
    rng = random.Random(3)
    for level in LEVELS:
        p = make_problem(rng, level)
        kinds = [k for k, _ in solution_parts(p, rng, 0.0)]
        assert kinds == ["step"] * level + ["answer"]
        kinds = [k for k, _ in solution_parts(p, rng, 1.0)]
        assert kinds == ["step", "check", "restate"] * level + ["answer"]
    with pytest.raises(ValueError):
        worked_solution("1+1=?", rng, 1.5)


def test_lengths_grow_with_level_and_sit_in_the_target_ranges(splits):
    stats = arith.length_stats(splits[0])
    means = [stats[lv]["mean_chars"] for lv in LEVELS]
    assert means == sorted(means) and len(set(means)) == len(means)
    assert 30 <= means[0] <= 60 and 150 <= means[-1] <= 250
    assert all(stats[lv]["redundant_fraction"] >= 0.3 for lv in LEVELS)


def test_splits_are_disjoint_deterministic_and_the_committed_heldout_is_reproduced(
        tmp_path, splits):
    train, heldout = splits
    assert {r["problem"] for r in train}.isdisjoint(r["problem"] for r in heldout)
    assert len({r["problem"] for r in heldout}) == len(heldout)
    assert len({r["id"] for r in train + heldout}) == len(train) + len(heldout)
    counts = [sum(r["level"] == lv for r in heldout) for lv in LEVELS]
    assert counts == [33, 100, 100, 100, 100, 100]  # level 1 has 135 problems: a quarter held out
    assert [sum(r["level"] == lv for r in train) for lv in LEVELS] == [300] * 6
    assert make_splits(train_per_level=300) == splits
    assert make_splits(train_per_level=300, seed=1) != splits
    paths = write_splits(tmp_path, train_per_level=5)  # held-out does not depend on train size
    assert Path(paths["heldout"]).read_bytes() == COMMITTED.read_bytes()
    assert Path(paths["train"]).read_text().count("\n") == 30
    for r in heldout:
        assert r["problem"].startswith("Q: ") and r["problem"].endswith("=?\nA: ")
        assert r["answer"] == str(fold(r["problem"][3:-4])) == boxed(r["solution"])


def test_the_trainer_reads_the_heldout_file_as_plain_prompts():
    from megatron_lead.data import DataStats, load_prompts

    stats = DataStats()
    records = load_prompts(str(COMMITTED), stats)
    assert stats.loaded == 533 and stats.skipped_bad_json == 0
    assert records[0].problem.startswith("Q: ") and records[0].level == "1"


@pytest.fixture(scope="module")
def task_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = save_task_tokenizer(tmp_path_factory.mktemp("arith_tok"))
    return path, AutoTokenizer.from_pretrained(path, local_files_only=True)


def test_tokenizer_one_token_per_character_round_trips_every_solution(task_tokenizer, splits):
    path, tok = task_tokenizer
    assert len(tok) == VOCAB_SIZE == len(CHARACTERS) + 2
    assert tok.pad_token_id == VOCAB_SIZE - 2 and tok.eos_token_id == VOCAB_SIZE - 1
    # Stored in the byte-level alphabet (space "Ġ", newline "Ċ"), decoded back to characters.
    assert [tok.decode([i]) for i in range(len(CHARACTERS))] == CHARACTERS
    assert tok.convert_ids_to_tokens(list(range(VOCAB_SIZE)))[len(CHARACTERS):] == list(SPECIALS)
    used = set()
    for r in splits[0][::7] + splits[1]:
        text = sft_text(r)
        used |= set(text[:-len(EOS)])
        ids = tok(text, add_special_tokens=True)["input_ids"]  # plain text: nothing is added
        assert ids == [CHARACTERS.index(c) for c in text[:-len(EOS)]] + [tok.eos_token_id]
        assert max(ids) < VOCAB_SIZE and tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == r["problem"] + r["solution"]
    assert used == set(CHARACTERS)  # the vocabulary is exactly what the task writes


def test_prompt_encoder_sends_exactly_the_prompt_text(task_tokenizer):
    from megatron_lead.data import PromptEncoder, PromptRecord

    enc = PromptEncoder(task_tokenizer[0], instruction="", use_chat_template=False)
    problem = prompt_text("7+3-5+2=?")
    _, ids = enc.encode([PromptRecord("a", problem, "7")])
    assert ids == [[CHARACTERS.index(c) for c in problem]] and enc.pad_token_id == VOCAB_SIZE - 2


def test_char_tokenizer_roles_and_bad_input(tmp_path):
    from transformers import AutoTokenizer

    from megatron_lead.data.char_tokenizer import save_char_tokenizer

    specials = ("<|x|>", "<|pad|>", "<|end|>")
    path = save_char_tokenizer(tmp_path / "t", list("ab"), specials, "{{ x }}")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert (tok.eos_token, tok.pad_token, tok.unk_token) == ("<|end|>", "<|pad|>", None)
    assert tok.chat_template == "{{ x }}" and tok("ab<|x|>")["input_ids"] == [0, 1, 2]
    with pytest.raises(ValueError):
        save_char_tokenizer(tmp_path / "u", ["ab"])
    with pytest.raises(ValueError):
        save_char_tokenizer(tmp_path / "v", list("ab"), ("<|e|>",), eos_token="<|nope|>")


def test_qwen2_config_builds_the_warm_start_model():
    import transformers

    cfg = qwen2_config()
    assert cfg["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"] == 32
    assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (VOCAB_SIZE - 1, VOCAB_SIZE - 2)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    h, v, f = 128, VOCAB_SIZE, 512
    per_layer = (h * h + h) + 2 * (h * 64 + 64) + h * h + 3 * h * f + 2 * h
    assert sum(p.numel() for p in model.parameters()) == v * h + 4 * per_layer + h  # tied head
    with pytest.raises(ValueError):
        qwen2_config(VOCAB_SIZE - 1)


def test_tokenizer_inside_a_qwen2_model_folder_gives_the_same_ids(tmp_path):
    """transformers 5 builds a Qwen2Tokenizer for any folder whose config.json says qwen2 (the
    warm-started model's); the task tokenizer must encode exactly as it does on its own."""
    import shutil

    import transformers

    from megatron_lead.data import arith

    alone, model = tmp_path / "tok", tmp_path / "model"
    arith.save_task_tokenizer(alone)
    shutil.copytree(alone, model)
    (model / "config.json").write_text(json.dumps(arith.qwen2_config()))
    t1 = transformers.AutoTokenizer.from_pretrained(str(alone))
    t2 = transformers.AutoTokenizer.from_pretrained(str(model))
    assert type(t2).__name__ == "Qwen2Tokenizer"
    text = "Q: 7+3-5=?\nA: 7+3=10, now 10-5.\nSo far 10-5.\n10-5=5.\nAnswer: \\boxed{5}"
    ids = [arith.CHARACTERS.index(c) for c in text]
    assert t1(text, add_special_tokens=False)["input_ids"] == ids
    assert t2(text, add_special_tokens=False)["input_ids"] == ids
    assert t2.decode(ids) == text and t2.eos_token_id == arith.EOS_ID
