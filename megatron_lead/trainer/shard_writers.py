"""Megatron's checkpoint shard writers, made to leave nothing behind (trainer/checkpoint.py).

A save runs Megatron's `torch_dist` writer, which forks writer processes and, by default, keeps a
multiprocessing Manager for their results; both can outlive a SIGKILLed trainer (docs/RELIABILITY.md).
"""

from __future__ import annotations

import contextlib
import os


def in_process_results_queue() -> None:
    """Give Megatron's shard writer a plain in-process queue for its results.

    By default it starts a multiprocessing Manager (a server process, plus Python's resource
    tracker) on the first save and keeps it for the life of the trainer; when the trainer is
    SIGKILLed, both outlive it (measured: still alive long after the kill). A synchronous save
    puts its results and reads them back in this very process, so a queue.Queue does the same
    job with no extra process; a fresh one per save, so a failed save leaves no stale result.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()


_FORK_GUARD: dict = {"armed": False, "parent": None, "libc": None}


def _die_with_the_trainer() -> None:
    """In a child forked during a save: SIGKILL me when the trainer dies (PR_SET_PDEATHSIG)."""
    if not _FORK_GUARD["armed"] or _FORK_GUARD["libc"] is None:
        return
    _FORK_GUARD["libc"].prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != _FORK_GUARD["parent"]:  # the trainer died before the line above
        os._exit(1)


@contextlib.contextmanager
def die_with_the_trainer():
    """Megatron's shard writers are forked processes that, when the trainer is SIGKILLed
    mid-save, can wait forever for a token the trainer never flushed to their pipe (measured:
    an orphan blocked in a pipe read, 500 MB resident, still there 30 s after the kill). While a
    save runs, a child forked by this process gets the parent-death signal SIGKILL (Linux; a
    no-op elsewhere), so the writers go with the trainer. libc is loaded before any fork."""
    if _FORK_GUARD["libc"] is None and hasattr(os, "register_at_fork"):
        try:
            import ctypes

            _FORK_GUARD["libc"] = ctypes.CDLL(None, use_errno=True)
            _FORK_GUARD["libc"].prctl  # noqa: B018 - resolve the symbol now, not in the child
            os.register_at_fork(after_in_child=_die_with_the_trainer)
        except (OSError, AttributeError):
            _FORK_GUARD["libc"] = None
    _FORK_GUARD.update(armed=True, parent=os.getpid())
    try:
        yield
    finally:
        _FORK_GUARD["armed"] = False
