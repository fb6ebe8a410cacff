"""`megatron-lead convert`: HF safetensors folder <-> Megatron checkpoint at a chosen TP x PP (x EP).

  megatron-lead convert hf-to-megatron --hf DIR --out DIR [--tp N] [--pp N] [--ep N]
  megatron-lead convert megatron-to-hf --megatron DIR --out DIR
  megatron-lead convert --list-families

Runs in one process, no GPU or process group: HF tensors are read lazily and sliced into the
TP x PP (x EP) shards; the export merges one tensor at a time and writes shard by shard.
`--list-families` prints each supported model_type, what it supports and what it refuses
(convert/families.py), so a user can tell before converting.
"""

from __future__ import annotations

import argparse
import time

HELP = "convert weights: HF folder <-> Megatron checkpoint at a chosen TP x PP (x EP)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list-families", action="store_true",
                   help="print the supported model families, what each supports and refuses")
    sub = p.add_subparsers(dest="direction", metavar="DIRECTION")
    to_meg = sub.add_parser("hf-to-megatron", help="HF safetensors folder -> Megatron checkpoint")
    to_meg.add_argument("--hf", required=True, help="HF model folder (config.json + *.safetensors)")
    to_meg.add_argument("--out", required=True, help="Megatron checkpoint folder to create")
    to_meg.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    to_meg.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    to_meg.add_argument("--ep", type=int, default=1,
                        help="expert-parallel size of a mixture-of-experts model (default 1)")
    to_meg.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    to_hf = sub.add_parser("megatron-to-hf", help="Megatron checkpoint -> HF safetensors folder")
    to_hf.add_argument("--megatron", required=True, help="Megatron checkpoint folder")
    to_hf.add_argument("--out", required=True, help="HF folder to create")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    if args.list_families:
        from megatron_lead.policy.convert.families import describe

        print(describe())
        return 0
    if args.direction is None:
        raise ValueError("give a direction (hf-to-megatron or megatron-to-hf) or --list-families")
    from megatron_lead.policy.convert.checkpoint import hf_to_megatron, megatron_to_hf

    start = time.perf_counter()
    if args.direction == "hf-to-megatron":
        hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, ep=args.ep, overwrite=args.overwrite)
        what = f"tp={args.tp} pp={args.pp}" + (f" ep={args.ep}" if args.ep > 1 else "") + " Megatron checkpoint"
    else:
        megatron_to_hf(args.megatron, args.out, overwrite=args.overwrite)
        what = "HF folder"
    print(f"wrote {what} to {args.out} in {time.perf_counter() - start:.1f}s")
    return 0
