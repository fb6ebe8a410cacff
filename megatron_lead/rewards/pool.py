"""A pool of worker processes that each run one task at a time under a wall-clock deadline.

Why not multiprocessing: the trainer holds torch/vLLM threads, so fork is unsafe, and both
"spawn" and "forkserver" re-import the parent's `__main__` in the child (a training script's
top-level `import torch` would land in every worker). A worker here is a fresh interpreter
(`subprocess.Popen`: fork+exec, the same start as "spawn") that imports only this module and
the task's module, and talks JSON lines over its stdin/stdout.

Scheduling: each idle worker gets the next task; the parent waits with `select` on the busy
workers' pipes until the earliest deadline. A worker past its deadline is SIGKILLed and the
task scored `timeout`; a worker whose pipe closes (crash, OOM kill, os.kill from outside) scores
its task `died`. Either way a replacement starts at once and joins when it reports ready, so
the pool survives. Workers ignore SIGINT (Ctrl-C is the parent's to handle) and cap their
address space. No worker outlives the pool: close() (also from atexit and __del__) kills and
reaps them; if the parent is killed outright, an idle worker sees stdin EOF (or its parent-pid
watchdog fires) and a busy one hits its CPU-time limit, set per task to timeout + 2 s.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import time
import weakref
from collections import deque

STARTUP_TIMEOUT = 120.0          # seconds for a fresh worker to import and warm up
MEMORY_LIMIT = 4 << 30           # bytes of address space per worker (RLIMIT_AS)
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LIVE: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


class _Worker:
    def __init__(self, target: str, warmup: list | None, timeout: float):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        code = "import sys; from megatron_lead.rewards.pool import _serve; _serve(*sys.argv[1:])"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, target, json.dumps(warmup), repr(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env, close_fds=True)
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False
        self.deadline = time.monotonic() + STARTUP_TIMEOUT  # startup, then the running task's
        self.task: int | None = None

    def send(self, args: list) -> bool:
        try:
            self.proc.stdin.write(json.dumps(args).encode() + b"\n")
            return True
        except (BrokenPipeError, OSError):
            return False

    def read_lines(self) -> list | None:
        """Complete lines now available, or None when the worker has gone (EOF)."""
        data = os.read(self.fd, 1 << 16)
        if not data:
            return None
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines]

    def kill(self, wait: bool = True) -> None:
        """SIGKILL; without wait the caller reaps later (a big process takes a while to tear down)."""
        if self.proc.poll() is None:
            self.proc.kill()
        if wait:
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class WorkerPool:
    """`map(tasks)` runs `target(*args)` for each args list, in parallel over the workers.

    target is "module:function", importable in a fresh interpreter, taking and returning JSON
    values. Each outcome is ("ok", value), ("error", message) when the function raised,
    ("timeout", None) or ("died", None).
    """

    def __init__(self, target: str, num_workers: int = 2, timeout: float = 5.0, warmup: list | None = None):
        if num_workers < 1 or not timeout > 0:
            raise ValueError(f"need num_workers >= 1 and timeout > 0, got {num_workers} and {timeout}")
        self.target, self.timeout, self.warmup = target, float(timeout), warmup
        self.workers: list[_Worker] = []
        self._dying: list[subprocess.Popen] = []  # killed, not yet reaped
        self._closed = False
        _LIVE.add(self)
        try:
            for _ in range(num_workers):
                self.workers.append(_Worker(target, warmup, self.timeout))
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def wait_ready(self) -> None:
        """Block until every worker has started (map does this by itself)."""
        self.map([])

    def _replace(self, w: _Worker) -> None:
        w.kill(wait=False)
        if self._closed:  # close() ran meanwhile (atexit while another thread maps): no respawn
            raise RuntimeError("WorkerPool was closed")
        self._dying = [p for p in self._dying if p.poll() is None] + [w.proc]
        self.workers[self.workers.index(w)] = _Worker(self.target, self.warmup, self.timeout)

    def map(self, tasks: list[list]) -> list[tuple[str, object]]:
        if self._closed:
            raise RuntimeError("WorkerPool is closed")
        out: list = [None] * len(tasks)
        try:
            self._run(tasks, out)
        except BaseException:  # startup failure, Ctrl-C: no worker may keep a task of this call
            for w in list(self.workers):
                if w.task is not None:
                    w.task = None
                    self._replace(w)
            raise
        return out

    def _run(self, tasks: list[list], out: list) -> None:
        todo = deque(range(len(tasks)))
        while True:
            for w in list(self.workers):
                if w.ready and w.task is None and w.proc.poll() is not None:
                    self._replace(w)  # died while idle: nothing lost
                elif w.ready and w.task is None and todo:
                    i = todo.popleft()
                    if w.send(tasks[i]):
                        w.task, w.deadline = i, time.monotonic() + self.timeout
                    else:
                        out[i] = ("died", None)
                        self._replace(w)
            busy = [w for w in self.workers if w.task is not None]
            starting = [w for w in self.workers if not w.ready]
            if not busy and not todo and (tasks or not starting):
                return
            watch = busy + starting
            wait = max(0.0, min(w.deadline for w in watch) - time.monotonic())
            readable, _, _ = select.select([w.fd for w in watch], [], [], wait)
            for w in watch:
                if w.fd in readable:
                    self._on_readable(w, out)
            now = time.monotonic()
            for w in watch:
                if w not in self.workers or now < w.deadline:
                    continue
                if not w.ready:
                    self._replace(w)
                    raise RuntimeError(f"grader worker did not start within {STARTUP_TIMEOUT:.0f}s")
                if w.task is not None:
                    out[w.task] = ("timeout", None)
                    self._replace(w)

    def _on_readable(self, w: _Worker, out: list) -> None:
        lines = w.read_lines()
        if lines is None:  # EOF: the worker is gone
            if not w.ready:
                code = w.proc.wait()
                self._replace(w)
                raise RuntimeError(f"grader worker exited with code {code} while starting (stderr above)")
            if w.task is not None:
                out[w.task] = ("died", None)
            self._replace(w)
            return
        for msg in lines:
            if not w.ready:
                w.ready = True
            elif w.task is not None:
                out[w.task] = ("ok", msg["ok"]) if "ok" in msg else ("error", msg.get("error"))
                w.task = None

    def close(self) -> None:
        """Kill every worker and reap it; idempotent."""
        self._closed = True
        workers, self.workers = self.workers, []
        for w in workers:
            w.kill()
        for p in self._dying:
            p.wait()
        self._dying = []
        _LIVE.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if hasattr(self, "_closed"):
            self.close()


@atexit.register
def _close_all() -> None:
    for pool in list(_LIVE):
        pool.close()


# ----------------------------------------------------------------------- worker side

def _serve(target: str, warmup_json: str, timeout: str) -> None:
    """Worker main loop: one JSON args list per stdin line, one JSON result per stdout line.

    Before each task the CPU-time limit is set to the time used so far + timeout + 1 s: should
    the parent die while this worker grinds on a hopeless answer, the kernel ends it (SIGXCPU)
    without needing the GIL, which a long sympy/bigint operation holds. While the parent lives,
    its wall-clock SIGKILL always comes first.
    """
    import importlib
    import resource
    import signal
    import threading

    out = os.fdopen(os.dup(1), "wb")  # the protocol's own copy of stdout; stray prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for limit, value in ((resource.RLIMIT_AS, MEMORY_LIMIT), (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass
    cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    parent = os.getppid()

    def watchdog():  # the parent died without closing our stdin (SIGKILL, crash)
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    warmup = json.loads(warmup_json)
    if warmup is not None:
        fn(*warmup)
    try:
        out.write(b'{"ready": true}\n')
        out.flush()
    except OSError:  # the parent has gone
        os._exit(0)
    for line in sys.stdin.buffer:
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime + float(timeout)) + 2
        if cpu_hard == resource.RLIM_INFINITY or soft <= cpu_hard:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, cpu_hard))
        try:
            reply = {"ok": fn(*json.loads(line))}
        except Exception as e:  # the task's fault, not the worker's: report and carry on
            reply = {"error": f"{type(e).__name__}: {e}"[:500]}
        try:
            out.write(json.dumps(reply).encode() + b"\n")
            out.flush()
        except OSError:  # the parent has gone
            os._exit(0)
