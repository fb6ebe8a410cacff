"""The correctness grader: extraction, math-verify equivalences, hostile answers, the worker pool
surviving timeouts and crashes, no orphan processes, and the `megatron-lead grade` command."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from megatron_lead.cli import main
from megatron_lead.rewards import REASONS, Grader, GradeResult, extract_last_boxed
from megatron_lead.rewards.pool import WorkerPool

TIMEOUT = 2.0
SLACK = 2.0  # the kill, and a CPU shared with busy workers


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=2, timeout=TIMEOUT) as g:
        g.wait_ready()
        yield g


@pytest.mark.parametrize("text,want", [
    (r"so the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),            # escaped braces do not count
    (r"\boxed 5.", "5"),
    (r"$\boxed 42$", "42"),
    (r"\fbox{7} end", "7"),
    (r"\boxed{a^{2}} and \fbox{b}", "b"),
    (r"\boxed{1} then \boxed{2", None),           # the last box is cut: no answer
    (r"\boxed{\frac{1}{2}", None),
    (r"\boxedx{3}", None),
    ("no box at all", None),
])
def test_extract_last_boxed(text, want):
    assert extract_last_boxed(text) == want


CASES = [
    (r"\boxed{\frac{1}{2}}", "0.5", "ok"),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt2}{2}", "ok"),
    (r"\boxed{42}", "42.0", "ok"),
    (r"\boxed{\dfrac{3}{4}}", "3/4", "ok"),
    (r"\boxed{[1,2)}", "[1,2)", "ok"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}", "ok"),
    (r"\boxed 7", "7", "ok"),
    (r"\boxed{3}", "4", "wrong"),
    (r"\boxed{[1,2]}", "[1,2)", "wrong"),
    (r"\boxed{\{1,3\}}", r"\{1,2\}", "wrong"),
    ("the answer is 4", "4", "no_boxed"),
    (r"\boxed{4}", "  ", "empty_answer"),
    (r"\boxed{}", "4", "parse_error"),
    (r"\boxed{" + "1+" * 6000 + "1}", "4", "parse_error"),  # over MAX_ANSWER_CHARS: never parsed
]


def test_verdicts(grader):
    got = grader.grade([c[0] for c in CASES], [c[1] for c in CASES])
    assert [(r.reason, r.correct) for r in got] == [(c[2], c[2] == "ok") for c in CASES]
    assert all(isinstance(r, GradeResult) and r.reason in REASONS for r in got)
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        grader.grade(["a", "b"], ["a"])


def test_hostile_numbers_are_refused_quickly(grader):
    start = time.monotonic()
    got = grader.grade([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{1000000!}", r"\boxed{2^{100}}"],
                       ["1", "1", "1267650600228229401496703205376"])
    assert [r.reason for r in got] == ["too_large", "too_large", "ok"]
    assert time.monotonic() - start < TIMEOUT


def test_model_text_is_not_executed(grader, tmp_path):
    marker = tmp_path / "pwned"
    responses = [rf"\boxed{{__import__('os').system('touch {marker}')}}",
                 rf"\boxed{{\text{{__import__('os').system('touch {marker}')}}}}",
                 rf"\boxed{{eval(\"open('{marker}','w')\")}}"]
    got = grader.grade(responses, ["0"] * 3)
    assert not any(r.correct for r in got) and not marker.exists()


def test_no_model_text_reaches_eval_in_a_worker():
    # audit every compile/exec in a worker-like process while it grades hostile text; the digits
    # 123456789 would show up too if numbers went through sympy's parse_expr (an eval)
    script = textwrap.dedent(r"""
        import sys
        from megatron_lead.rewards import math as m
        m.grade_one(r"\frac12", "0.5")
        seen = []
        sys.addaudithook(lambda ev, args: seen.append(repr(args[0])) if ev in ("compile", "exec") else None)
        for text in [r"__import__('os').system('MARKER')", r"\text{MARKER}", r"MARKER(1)", r"\mathrm{MARKER}+1",
                     r"\frac{MARKER}{2}", r"\operatorname{MARKER}(x)", r"MARKER 123456789+987654321",
                     r"\frac{123456789}{2}", r"123456789.5"]:
            m.grade_one(text, "1")
        print(sum(w in s for s in seen for w in ("MARKER", "marker", "123456789")), m._REFUSED[0])
        import sympy  # the guard itself: numbers without eval, anything else refused and counted
        print(sympy.sympify("12") == 12, sympy.sympify("0.5") == 0.5, m._REFUSED[0], end=" ")
        try:
            sympy.sympify("__import__('os')")
        except Exception:
            print(m._REFUSED[0], sum("__import__" in s for s in seen))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.split()
    assert out[:2] == ["0", "0"]  # nothing compiled from model text; parse_expr never even asked
    assert out[2:] == ["True", "True", "0", "1", "0"]


def _gone(pid):
    """The process has exited (reaped, or waitable: every thread of it is done)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already, or not our child
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True


def _wait_gone(pids, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(_gone(p) for p in pids)


def test_timeout_kills_the_worker_and_the_pool_goes_on():
    with Grader(num_workers=2, timeout=TIMEOUT, max_digits=None) as g:  # size check off: the clock decides
        g.wait_ready()  # a deadline runs from dispatch: time only the answers, not the start-up
        before = set(g.pids)
        start = time.monotonic()
        got = g.grade([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{1000000!}"], ["1", "1"])
        assert time.monotonic() - start < TIMEOUT + SLACK
        assert [r.reason for r in got] == ["timeout", "timeout"]
        assert _wait_gone(before) and not before & set(g.pids)
        after = g.grade([r"\boxed{2}", r"\boxed{3}"], ["2", "4"])
        assert after == [GradeResult(True, "ok"), GradeResult(False, "wrong")]
        assert g.counts["timeout"] == 2


def test_worker_killed_from_outside_is_replaced():
    with Grader(num_workers=1, timeout=30, max_digits=None) as g:
        g.grade([r"\boxed{1}"], ["1"])
        idle = g.pids[0]
        os.kill(idle, signal.SIGKILL)  # killed while idle: its death costs no answer
        while not _gone(idle):
            time.sleep(0.01)
        assert g.grade([r"\boxed{1}"], ["1"]) == [GradeResult(True, "ok")]
        busy = g.pids[0]
        assert busy != idle
        threading.Timer(1.0, os.kill, (busy, signal.SIGKILL)).start()  # busy on a hopeless answer
        got = g.grade([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{5}"], ["1", "5"])
        assert [r.reason for r in got] == ["grader_error", "ok"]
        assert _wait_gone([busy]) and g.pids[0] != busy


def test_pool_outcomes():
    with WorkerPool("time:sleep", num_workers=1, timeout=1.0) as pool:
        assert pool.map([[0], [5], [0]]) == [("ok", None), ("timeout", None), ("ok", None)]
        assert pool.map([["x"]])[0][0] == "error"  # the function raised: reported, worker kept
    with WorkerPool("os:_exit", num_workers=1, timeout=5.0) as pool:
        assert pool.map([[3]]) == [("died", None)]


def test_close_leaves_no_process(tmp_path):
    g = Grader(num_workers=2, timeout=TIMEOUT)
    pids = g.pids
    g.grade([r"\boxed{1}"], ["1"])
    g.close()
    g.close()
    assert not any(psutil.pid_exists(p) for p in pids)
    mine = {c.pid for c in psutil.Process().children(recursive=True)}
    assert not mine & set(pids)
    # without close: at interpreter exit, idle or grading (atexit), and when the parent is
    # SIGKILLed, idle (stdin EOF) or while a worker grinds on a hopeless answer (CPU-time limit)
    busy = "threading.Thread(target=g.grade, args=([HOPELESS] * 2, ['1'] * 2), daemon=True).start(); time.sleep(0.5); "
    for ending, seconds in [("pass", 5), (busy, 1.5), ("os.kill(os.getpid(), signal.SIGKILL)", 5),
                            (busy + "os.kill(os.getpid(), signal.SIGKILL)", 30)]:
        script = ("import os, signal, threading, time; from megatron_lead.rewards import Grader; "
                  "HOPELESS = r'\\boxed{9^{9^{9^{9}}}}'; g = Grader(2, timeout=1.0, max_digits=None); "
                  f"g.wait_ready(); print(*g.pids, flush=True); {ending}")
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        pids = [int(p) for p in r.stdout.split()]
        assert len(pids) == 2, r.stderr
        assert _wait_gone(pids, seconds), ending


# ---------------------------------------------------------------------------- the command

def write(tmp_path, lines):
    p = tmp_path / "in.jsonl"
    p.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return p


def test_cli_output_is_input_plus_verdict(tmp_path, capsys):
    lines = [{"id": "a", "response": r"so \boxed{\frac12}", "answer": "0.5", "meta": {"k": [1, 2]}},
             {"response": "no box", "answer": "3"},
             {"response": r"\boxed{4}", "answer": "3", "step": 7}]
    src, out = write(tmp_path, lines[:2] + [""] + lines[2:]), tmp_path / "sub" / "out.jsonl"
    assert main(["grade", str(src), "--out", str(out), "--timeout", "3", "--workers", "1"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    verdicts = [(True, "ok"), (False, "no_boxed"), (False, "wrong")]
    assert got == [{**rec, "correct": c, "reason": why} for rec, (c, why) in zip(lines, verdicts)]
    summary = capsys.readouterr().out.strip()
    assert "\n" not in summary and "accuracy 0.3333 (1/3)" in summary and "no_boxed=1" in summary
    assert not (tmp_path / "sub" / "out.jsonl.tmp").exists()


@pytest.mark.parametrize("line,message", [
    ("{not json", "line 2: not valid JSON"),
    ([1, 2], "line 2: expected a JSON object"),
    ({"answer": "1"}, "line 2: field 'response' is missing or not a string"),
    ({"response": 3, "answer": "1"}, "line 2: field 'response'"),
    ({"response": "x", "answer": 1}, "line 2: field 'answer' is missing or not a string"),
])
def test_cli_bad_line_is_one_line_naming_it(tmp_path, capsys, line, message):
    src, out = write(tmp_path, [{"response": "x", "answer": "1"}, line]), tmp_path / "o.jsonl"
    assert main(["grade", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and str(src) in err, err
    assert not out.exists()


def test_cli_missing_file_through_console(tmp_path):
    r = subprocess.run([sys.executable, "-m", "megatron_lead.cli", "grade", str(tmp_path / "nope.jsonl"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope.jsonl" in r.stderr
