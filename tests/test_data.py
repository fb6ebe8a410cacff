"""The data phase: loading and validating prompt files, templating, the resumable sampler."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_lead.data import (DEFAULT_INSTRUCTION, DataStats, PromptEncoder, PromptRecord,
                                PromptSampler, epoch_permutation, load_prompts)
from tiny_tokenizer import EOS, PAD, save_tiny_tokenizer

RECORDS = [PromptRecord("q1", "What is 1+1?", "2", "Level 1"),
           PromptRecord("q2", "Find x if 2x = 6.", "3", None),
           PromptRecord("q3", "Compute 7*6.", "42", "Level 2")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows_of(records, key="prompt"):
    return [{"id": r.id, key: r.problem, "answer": r.answer,
             **({"level": r.level} if r.level is not None else {})} for r in records]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


# ---- loading -----------------------------------------------------------------------------

def test_jsonl_prompt_problem_and_parquet_give_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    by_prompt = load_prompts(write_jsonl(tmp_path / "a.jsonl", rows_of(RECORDS, "prompt")))
    by_problem = load_prompts(write_jsonl(tmp_path / "b.jsonl", rows_of(RECORDS, "problem")))
    pq.write_table(pa.Table.from_pylist(rows_of(RECORDS, "problem")), tmp_path / "c.parquet")
    stats = DataStats()
    from_parquet = load_prompts(str(tmp_path / "c.parquet"), stats)
    assert by_prompt == by_problem == from_parquet == RECORDS
    assert stats.loaded == 3 and stats.skipped == 0


def test_missing_ids_are_line_numbers_in_jsonl_and_row_numbers_in_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": r.problem, "answer": r.answer} for r in RECORDS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert [r.id for r in load_prompts(write_jsonl(tmp_path / "p.jsonl", rows))] == ["1", "2", "3"]
    assert [r.id for r in load_prompts(str(tmp_path / "p.parquet"))] == ["1", "2", "3"]


BAD_FILE = b"\n".join([
    b'{"id": "a", "prompt": "What is 1+1?", "answer": "2"}',                 # kept
    b'{"id": "b", "problem": "What is 2+2?", "answer": 4, "difficulty": 1}',  # kept, answer "4"
    b'{"id": "c", "prompt": "No answer key"}',                               # missing answer
    b'{"id": "d", "prompt": "Null answer", "answer": null}',                  # missing answer
    b'{"id": "e", "prompt": "Blank answer", "answer": "  "}',                 # empty answer
    b'{"id": "f", "prompt": ["not", "text"], "answer": "1"}',                 # bad prompt
    b'{"id": "g", "prompt": "", "answer": "1"}',                              # bad prompt
    b'{"id": "h", "answer": "1"}',                                            # bad prompt
    b'{"id": {"x": 1}, "prompt": "Odd id", "answer": "1"}',                   # bad prompt (id)
    b'{"id": "a", "prompt": "Same id as the first row", "answer": "3"}',      # duplicate id
    b'{"id": "i", "prompt": "List answer", "answer": ["1"]}',                 # bad answer
    b'[1, 2, 3]',                                                             # bad json
    b'{"id": "j", "prompt": "unterminated',                                   # bad json
    b'\xff\xfe{"id": "k"}',                                                   # bad json (UTF-8)
    b'',                                                                      # blank: not a row
    b'{"prompt": "No id given", "answer": "5"}',                              # kept, id "16"
    b'{"id": "l", "prompt": "Truncated at the end", "ans',                    # bad json
])


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_FILE)
    stats = DataStats()
    records = load_prompts(str(path), stats)
    assert [(r.id, r.answer, r.level) for r in records] == [("a", "2", None), ("b", "4", "1"),
                                                             ("16", "5", None)]
    assert stats.as_dict() == dict(loaded=3, skipped_bad_json=4, skipped_missing_answer=2,
                                   skipped_empty_answer=1, skipped_bad_answer=1,
                                   skipped_bad_prompt=4, skipped_duplicate_id=1,
                                   dropped_too_long=0)
    load_prompts(str(path), stats)  # counts add up over calls
    assert stats.loaded == 6 and stats.skipped_duplicate_id == 2


def test_a_bad_row_does_not_claim_its_id(tmp_path):
    rows = [{"id": "x", "prompt": "p", "answer": ""}, {"id": "x", "prompt": "p", "answer": "1"}]
    stats = DataStats()
    assert [r.answer for r in load_prompts(write_jsonl(tmp_path / "d.jsonl", rows), stats)] == ["1"]
    assert stats.skipped_empty_answer == 1 and stats.skipped_duplicate_id == 0


def test_json_array_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows_of(RECORDS)))
    assert load_prompts(str(path)) == RECORDS


def one_line_error(exc_type, path):
    with pytest.raises(exc_type) as e:
        load_prompts(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    return str(e.value)


def test_unusable_files_are_refused_with_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    one_line_error(FileNotFoundError, tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    one_line_error(ValueError, tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "all_bad.jsonl", [{"prompt": "p"}, {"prompt": "q", "answer": ""}])
    assert "skipped_missing_answer=1" in one_line_error(ValueError, tmp_path / "all_bad.jsonl")
    pq.write_table(pa.Table.from_pylist(rows_of(RECORDS)), tmp_path / "good.parquet")
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    one_line_error(ValueError, tmp_path / "cut.parquet")
    (tmp_path / "holed.parquet").write_bytes(data[:20] + bytes(40) + data[60:])
    one_line_error(ValueError, tmp_path / "holed.parquet")
    (tmp_path / "text.parquet").write_text("this is not parquet\n" * 10)
    one_line_error(ValueError, tmp_path / "text.parquet")
    (tmp_path / "prompts.csv").write_text("prompt,answer\n")
    one_line_error(ValueError, tmp_path / "prompts.csv")


# ---- templating ----------------------------------------------------------------------------

def test_tiny_tokenizer_has_256_decodable_ids(tokenizer_dir):
    enc = PromptEncoder(tokenizer_dir)
    assert len(enc.tokenizer) == 256
    assert (enc.eos_token_id, enc.pad_token_id, enc.tokenizer.bos_token_id) == (255, 253, 254)
    assert enc.tokenizer.convert_ids_to_tokens([253, 255]) == [PAD, EOS]
    assert all(len(enc.decode([i])) == 1 for i in range(250))  # one character each
    assert enc.decode(list(range(250, 256))) == ""  # special tokens are skipped for grading
    enc.tokenizer.pad_token = None  # most causal LMs have no pad token: fall back to EOS
    assert enc.pad_token_id == 255


def test_chat_template_output(tokenizer_dir):
    enc = PromptEncoder(tokenizer_dir)
    expected = ("<|im_start|>user\nWhat is 1+1? Let's think step by step and output the final "
                "answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert enc.uses_chat_template and enc.prompt_text("What is 1+1?") == expected
    records, ids = enc.encode(RECORDS[:1])
    assert records == RECORDS[:1]
    ids = ids[0]
    assert ids[0] == 251 and ids.count(251) == 2 and ids.count(252) == 1  # markers are one token
    assert len(ids) == len(expected) - 2 * (len("<|im_start|>") - 1) - (len("<|im_end|>") - 1)
    assert enc.decode(ids) == expected.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_plain_text_without_chat_template(tokenizer_dir, tmp_path):
    assert PromptEncoder(tokenizer_dir, use_chat_template=False).prompt_text("Q?") == \
        "Q?" + DEFAULT_INSTRUCTION
    base = save_tiny_tokenizer(tmp_path / "base")  # a base model's tokenizer: no template
    config = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(config))
    enc = PromptEncoder(base, instruction=" Answer:")
    assert not enc.uses_chat_template and enc.prompt_text("Q?") == "Q? Answer:"
    assert enc.encode([RECORDS[0]])[1][0] == enc.tokenizer.encode("What is 1+1? Answer:")


def test_too_long_prompts_are_dropped_and_counted(tokenizer_dir):
    length = len(PromptEncoder(tokenizer_dir).encode(RECORDS[:1])[1][0])
    enc = PromptEncoder(tokenizer_dir, max_prompt_len=length)
    same = PromptRecord("same", "x" * len(RECORDS[0].problem), "1")  # exactly max_prompt_len
    longer = PromptRecord("longer", RECORDS[0].problem + "!", "1")
    shorter = PromptRecord("shorter", "1+1?", "2")
    stats = DataStats()
    records, ids = enc.encode([same, longer, shorter], stats)
    assert [r.id for r in records] == ["same", "shorter"] and stats.dropped_too_long == 1
    assert [len(x) for x in ids] == [length, length - len(RECORDS[0].problem) + 4]
    with pytest.raises(ValueError, match="max_prompt_len"):
        PromptEncoder(tokenizer_dir, max_prompt_len=0)


# ---- sampler -------------------------------------------------------------------------------

def batches(sampler, steps):
    return [sampler.next_batch() for _ in range(steps)]


def test_sampler_is_deterministic_and_ignores_the_global_rng():
    torch.manual_seed(1)
    a = batches(PromptSampler(10, 3, seed=7), 8)
    torch.manual_seed(2)
    torch.rand(5)
    assert batches(PromptSampler(10, 3, seed=7), 8) == a
    assert batches(PromptSampler(10, 3, seed=8), 8) != a


def test_each_epoch_is_a_permutation_and_epochs_differ():
    sampler = PromptSampler(10, 3, seed=0)  # 3 full batches an epoch, the 10th prompt dropped
    epochs = []
    for epoch in range(3):
        got = batches(sampler, 3)
        assert all(len(b) == 3 for b in got) and sampler.epoch == epoch
        flat = sum(got, [])
        assert len(set(flat)) == 9 and flat == epoch_permutation(10, 0, epoch)[:9]
        epochs.append(flat)
    assert epochs[0] != epochs[1] != epochs[2]
    even = PromptSampler(6, 3, seed=0)  # no remainder: every prompt once per epoch
    assert [sorted(sum(batches(even, 2), [])) for _ in range(2)] == [list(range(6))] * 2
    assert even.epoch == 1


def test_without_drop_last_the_epoch_ends_with_a_short_batch():
    got = batches(PromptSampler(10, 3, seed=0, drop_last=False), 5)
    assert [len(b) for b in got] == [3, 3, 3, 1, 3]
    assert sorted(sum(got[:4], [])) == list(range(10))


def test_resume_mid_epoch_continues_identically():
    uninterrupted = PromptSampler(10, 3, seed=5)
    batches(uninterrupted, 2)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # as stored in a checkpoint
    assert state == dict(epoch=0, position=6, seed=5, num_prompts=10, batch_size=3)
    resumed = PromptSampler(10, 3, seed=999)
    resumed.load_state_dict(state)
    assert batches(resumed, 7) == batches(uninterrupted, 7)  # crosses two epoch boundaries


def test_resume_with_another_dataset_or_batch_size_is_refused():
    state = PromptSampler(10, 3, seed=0).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(10, 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="num_prompts"):
        PromptSampler(11, 3, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(2, 3, seed=0)


def test_stratified_batches_hold_every_level_equally_and_resume():
    from megatron_lead.data.sampler import PromptSampler, stratified

    # By hand: order 5,0,3,1,4,2 with levels a,a,b,b,c,c -> buckets a:[0,1] b:[3,2]... round-robin.
    assert stratified([5, 0, 3, 1, 4, 2], ["a", "a", "b", "b", "c", "c"]) == [5, 0, 3, 4, 1, 2]
    levels = [i % 6 + 1 for i in range(120)]  # 20 prompts of each of 6 levels
    s = PromptSampler(120, 12, seed=3, groups=levels)
    for _ in range(10):
        batch = s.next_batch()
        assert sorted(levels[i] for i in batch) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    plain = PromptSampler(120, 12, seed=3)
    assert any(sorted(levels[i] for i in plain.next_batch()) != [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
               for _ in range(10))  # without groups the batches are not balanced
    # Every epoch is still a permutation, and a resumed stratified sampler continues identically.
    a = PromptSampler(120, 12, seed=3, groups=levels)
    seen = [i for _ in range(10) for i in a.next_batch()]
    assert sorted(seen) == list(range(120))
    b = PromptSampler(120, 12, seed=3, groups=levels)
    b.load_state_dict(a.state_dict())
    assert [a.next_batch() for _ in range(3)] == [b.next_batch() for _ in range(3)]
    with pytest.raises(ValueError, match="group labels"):
        PromptSampler(120, 12, seed=3, groups=levels[:5])


def test_capped_validation_spreads_over_a_file_sorted_by_level():
    """validation.max_prompts keeps every part of the file: 12 of 533 rows sorted by level
    (the built-in held-out split's order) reach the last level, evenly spaced, in file order."""
    from megatron_lead.data import spread

    levels = [1 + (6 * i) // 533 for i in range(533)]
    keep = spread(533, 12)
    assert keep == sorted(set(keep)) and len(keep) == 12 and keep[0] == 0
    assert {levels[i] for i in keep} == {1, 2, 3, 4, 5, 6}
    assert all(1 <= [levels[i] for i in keep].count(lv) <= 3 for lv in range(1, 7))
    assert spread(5, 0) == spread(5, 9) == [0, 1, 2, 3, 4]
