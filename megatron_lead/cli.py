"""`megatron-lead <command>`: one entry point, one module per command.

A command module defines `HELP`, `add_arguments(parser)` and `run(args) -> int`, and keeps
its heavy imports (Megatron, vLLM) inside `run`, so `megatron-lead --help` stays instant.
Errors a user can fix (bad input, bad settings, missing files) are raised as ValueError or
OSError, failures of a run (a rank or vLLM that died) as RuntimeError; all are printed as one
line; MEGATRON_LEAD_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "demo": "megatron_lead.demo",
    "train": "megatron_lead.trainer.cli",
    "sft": "megatron_lead.trainer.sft",
    "replay": "megatron_lead.replay",
    "convert": "megatron_lead.policy.convert.cli",
    "grade": "megatron_lead.rewards.cli",
    "eval": "megatron_lead.eval.cli",
    "compare": "megatron_lead.eval.compare",
    "plan": "megatron_lead.plan.cli",
    "prepare-data": "megatron_lead.data.prepare",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-lead", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, path in COMMANDS.items():
        try:
            mod = importlib.import_module(path)
        except ModuleNotFoundError as e:  # a command whose package is not part of this install
            if not e.name or not path.startswith(e.name):
                raise
            continue
        modules[name] = mod
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.HELP))
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, OSError, RuntimeError) as e:
        if os.environ.get("MEGATRON_LEAD_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"megatron-lead {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
