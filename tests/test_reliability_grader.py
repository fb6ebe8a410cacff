"""Hostile model outputs against the grader: tests/data/hostile_answers.jsonl (>= 100 cases).

Every case is graded in one batch by one Grader (2 workers): code-like strings whose payload
would `touch` a canary file, enormous powers and factorials, deep nesting, megabyte-long
responses, invalid UTF-8 and control characters, LaTeX that crashes or hangs parsers. Each must
be graded incorrect with a known reason, within its timeout; no file appears (the canary, and
the grader's working folder is listed before and after), no process is left besides the pool's
workers, and the same pool then still grades the legitimate equivalences correct.

Corpus lines: {"id", "category", "answer", and one of "response" | "build" (segments [text,
times] joined: the megabyte cases stay small on disk) | "response_b64" (raw bytes, decoded as
the trainer's tokenizer might hand them over: with surrogateescape, so invalid UTF-8 arrives as
lone surrogates)}; "{CANARY}" in a response is replaced by the canary's path.
"""

import base64
import json
import os
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from megatron_lead.rewards import REASONS, Grader, GradeResult

CORPUS = Path(__file__).parent / "data" / "hostile_answers.jsonl"
CATEGORIES = {"code", "huge", "nested", "long", "encoding", "control", "latex"}
TIMEOUT = 3.0
WORKERS = 2
EQUIVALENCES = [  # (response, gold): still correct after the hostile batch
    (r"\boxed{\frac{1}{2}}", "0.5"), (r"\boxed{0.5}", r"\frac{1}{2}"), (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt2}{2}"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2"), (r"\boxed{[1,2)}", "[1,2)"), (r"\boxed{(0,\infty)}", r"(0,\infty)"),
    (r"\boxed{\{1,2\}}", r"\{2,1\}"), (r"\boxed{\{3, 1, 2\}}", r"\{1,2,3\}"), (r"\boxed{2^{10}}", "1024"),
    (r"\boxed{\dfrac{3}{4}}", "0.75"), (r"\boxed{12345}", "12345"),
]


def load_corpus(canary: str) -> list[dict]:
    cases = []
    with open(CORPUS) as f:
        for line in f:
            row = json.loads(line)
            if "build" in row:
                text = "".join(part * times for part, times in row["build"])
            elif "response_b64" in row:
                text = base64.b64decode(row["response_b64"]).decode("utf-8", errors="surrogateescape")
            else:
                text = row["response"]
            cases.append({**row, "text": text.replace("{CANARY}", canary)})
    return cases


def _processes() -> set[int]:
    """Live (non-zombie) descendants of this test process."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    work = tmp_path_factory.mktemp("grader_cwd")
    canary = str(work / "canary")
    cases = load_corpus(canary)
    cwd = os.getcwd()
    os.chdir(work)  # the workers start here: a stray relative write would land in this folder
    try:
        with Grader(num_workers=WORKERS, timeout=TIMEOUT) as g:
            g.wait_ready()
            before = {"listing": sorted(os.listdir(work)), "pids": set(g.pids), "procs": _processes()}
            start = time.monotonic()
            results = g.grade([c["text"] for c in cases], [c["answer"] for c in cases])
            seconds = time.monotonic() - start
            time.sleep(1.0)  # a killed worker is reaped lazily; let it go
            g.grade([r"\boxed{1}"], ["1"])  # reaps what the batch killed
            after = {"listing": sorted(os.listdir(work)), "pids": set(g.pids), "procs": _processes(),
                     "children_of_workers": sum(len(psutil.Process(p).children()) for p in g.pids)}
            equivalences = g.grade([r for r, _ in EQUIVALENCES], [a for _, a in EQUIVALENCES])
            counts = dict(g.counts)
    finally:
        os.chdir(cwd)
    reasons = Counter(r.reason for r in results)
    print(f"\n{len(cases)} hostile answers graded in {seconds:.1f} s: {dict(reasons)}")
    return dict(cases=cases, results=results, seconds=seconds, before=before, after=after,
                equivalences=equivalences, canary=canary, counts=counts, reasons=reasons)


def test_the_corpus_covers_every_kind(graded):
    cases = graded["cases"]
    assert len(cases) >= 100 and len({c["id"] for c in cases}) == len(cases)
    assert {c["category"] for c in cases} == CATEGORIES
    assert max(len(c["text"]) for c in cases) >= 1 << 20  # a megabyte-long answer
    assert any("\udc80" <= ch <= "\udcff" for c in cases for ch in c["text"])  # invalid UTF-8
    assert sum("touch " + graded["canary"] in c["text"] for c in cases) >= 20


@pytest.mark.slow
def test_every_hostile_answer_is_graded_incorrect(graded):
    for case, result in zip(graded["cases"], graded["results"]):
        assert isinstance(result, GradeResult) and result.reason in REASONS, case["id"]
        assert result.correct is False, (case["id"], result)


@pytest.mark.slow
def test_nothing_runs_no_file_no_process(graded):
    before, after = graded["before"], graded["after"]
    assert not os.path.exists(graded["canary"])
    assert after["listing"] == before["listing"] == []
    # the only new processes are the pool's replacement workers; the replaced ones are gone
    assert after["procs"] - before["procs"] <= after["pids"] and len(after["pids"]) == WORKERS
    assert not (before["pids"] - after["pids"]) & after["procs"]
    assert after["children_of_workers"] == 0


@pytest.mark.slow
def test_within_the_timeouts_and_the_pool_survives(graded):
    reasons = graded["reasons"]
    timeouts = reasons.get("timeout", 0) + reasons.get("grader_error", 0)
    # every answer is bounded by TIMEOUT; the rest of the corpus grades in well under a minute
    assert graded["seconds"] < TIMEOUT * timeouts + 60
    if timeouts:  # a killed or hung worker was replaced by a fresh one
        assert graded["after"]["pids"] != graded["before"]["pids"]
    assert [r.correct for r in graded["equivalences"]] == [True] * len(EQUIVALENCES), graded["equivalences"]


@pytest.mark.slow
def test_hung_workers_are_replaced_when_only_the_clock_can_stop_them():
    # size check off: 9^{9^{9^9}} and 1000000! really compute until the worker is killed
    with Grader(num_workers=WORKERS, timeout=TIMEOUT, max_digits=None) as g:
        g.wait_ready()
        first = set(g.pids)
        start = time.monotonic()
        got = g.grade([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{1000000!}"], ["1", "1"])
        assert time.monotonic() - start < TIMEOUT + 3.0
        assert [r.reason for r in got] == ["timeout", "timeout"]
        assert not first & set(g.pids)
        got = g.grade([r for r, _ in EQUIVALENCES], [a for _, a in EQUIVALENCES])
        assert all(r.correct for r in got), got


def test_deep_nesting_is_refused_before_any_worker_parses_it():
    from megatron_lead.rewards.math import MAX_NESTING, precheck

    deep = "\\frac{" * (MAX_NESTING + 1) + "1" + "}{2}" * (MAX_NESTING + 1)
    assert precheck(rf"\boxed{{{deep}}}", "1") == (None, "parse_error")
    ok = "\\frac{" * 10 + "1" + "}{2}" * 10
    assert precheck(rf"\boxed{{{ok}}}", "1") == (ok, None)
    assert precheck(r"\boxed{\left(\frac{\sqrt{2}}{2}\right)}", "1")[1] is None
