"""Bad data that tests/test_data.py does not already cover: text a tokenizer refuses (lone
surrogates, valid in JSON), control characters, bad rows in Parquet, files that hold nothing."""

import json

import pytest

from megatron_lead.data import DataStats, PromptEncoder, load_prompts


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tiny_tokenizer import save_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(str(path))
    return str(path)


def test_text_the_tokenizer_would_refuse_is_skipped_and_counted(tmp_path, tokenizer_dir):
    rows = [{"id": "a", "prompt": "fine", "answer": "1"},
            {"id": "b", "prompt": "lone \ud800 surrogate", "answer": "2"},   # json.dumps writes \ud800
            {"id": "c", "prompt": "ok", "answer": "\udcff"},
            {"id": "\ud83d", "prompt": "ok", "answer": "3"},
            {"id": "d", "prompt": "control \x00\x1b[31m\x7f characters", "answer": "4"},  # kept: encodable
            {"id": "e", "prompt": 12345, "answer": "5"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "\\ud800" in path.read_text()
    stats = DataStats()
    records = load_prompts(str(path), stats)
    assert [r.id for r in records] == ["a", "d"]
    assert (stats.skipped_bad_prompt, stats.skipped_bad_answer) == (3, 1)
    kept, ids = PromptEncoder(tokenizer_dir, max_prompt_len=512).encode(records, stats)  # did raise before
    assert [r.id for r in kept] == ["a", "d"] and all(ids)


def test_bad_rows_in_parquet_are_skipped_and_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ["a", "b", "c", "a", "d", "e"],
                      "prompt": ["p1", None, "p3", "p4", "", "p6"],
                      "answer": ["1", "2", None, "4", "5", "  "]})
    pq.write_table(table, tmp_path / "p.parquet")
    stats = DataStats()
    assert [r.id for r in load_prompts(str(tmp_path / "p.parquet"), stats)] == ["a"]
    assert stats.as_dict() == dict(loaded=1, skipped_bad_json=0, skipped_missing_answer=1,
                                   skipped_empty_answer=1, skipped_bad_answer=0, skipped_bad_prompt=2,
                                   skipped_duplicate_id=1, dropped_too_long=0)
    pq.write_table(pa.table({"prompt": [1, 2], "answer": ["1", "2"]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError) as e:  # non-string prompts only: nothing usable, one line
        load_prompts(str(tmp_path / "ints.parquet"))
    assert "\n" not in str(e.value) and "skipped_bad_prompt=2" in str(e.value)


@pytest.mark.parametrize("content", [b"", b"\n\n", b"[]", b"{\"prompt\": \"p\", \"answer\": \"1\"",  # truncated
                                     b"\x00\x00\x00", b"[{\"prompt\": \"p\""])
def test_files_with_nothing_usable_are_refused_with_one_line(tmp_path, content):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_prompts(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)
