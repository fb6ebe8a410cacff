"""Read HF safetensors lazily (a slice at a time) and write an HF model folder shard by shard."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
INDEX_FILE = "model.safetensors.index.json"


class HFReader:
    """Named tensors of an HF folder's *.safetensors files, opened lazily (nothing loaded upfront)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        if not os.path.isdir(hf_dir):
            raise FileNotFoundError(f"HF model folder {hf_dir} does not exist")
        index = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index):  # sharded: only the files the index names
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {hf_dir}")
        self._stack = contextlib.ExitStack()
        self._file_of: dict[str, object] = {}
        for name in files:
            path = os.path.join(hf_dir, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{INDEX_FILE} in {hf_dir} names missing file {name}")
            handle = self._stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            for key in handle.keys():
                if key in self._file_of:
                    raise ValueError(f"tensor {key!r} appears in two files of {hf_dir}")
                self._file_of[key] = handle

    def names(self) -> list[str]:
        return list(self._file_of)

    def __call__(self, name: str, start: int | None = None, stop: int | None = None,
                 cols: bool = False) -> torch.Tensor:
        """Rows [start, stop) of `name` (or columns with cols=True); whole tensor without bounds."""
        handle = self._file_of.get(name)
        if handle is None:
            raise ValueError(f"HF checkpoint {self.hf_dir} is missing tensor {name!r}")
        if start is None:
            return handle.get_tensor(name)
        part = handle.get_slice(name)
        return part[:, start:stop] if cols else part[start:stop]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def copy_hf_side_files(src_dir: str, dst_dir: str) -> None:
    """Copy config, tokenizer and generation files (every top-level non-weight file)."""
    for name in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, name)
        if os.path.isfile(path) and not name.endswith(WEIGHT_SUFFIXES) and name != INDEX_FILE \
                and not name.endswith(".index.json"):
            shutil.copy2(path, os.path.join(dst_dir, name))


def make_temp_dir(final_dir: str, overwrite: bool = False) -> str:
    """A fresh temp folder next to final_dir (same file system, so the final rename is atomic)."""
    final_dir = os.path.abspath(final_dir)
    if os.path.exists(final_dir) and (not os.path.isdir(final_dir) or os.listdir(final_dir)) \
            and not overwrite:
        raise FileExistsError(f"output folder {final_dir} exists and is not empty")
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(final_dir)}.tmp-", dir=parent)


def commit_dir(tmp: str, final_dir: str) -> None:
    """Move a finished temp folder to final_dir, replacing what was there."""
    final_dir = os.path.abspath(final_dir)
    if os.path.exists(final_dir):
        old = tmp + ".old"
        os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final_dir)


@contextlib.contextmanager
def atomic_dir(final_dir: str, overwrite: bool = False):
    """Yield a temp folder next to final_dir; it becomes final_dir only if the block succeeds."""
    tmp = make_temp_dir(final_dir, overwrite)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, final_dir)


def write_hf_folder(named_tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str,
                    side_files_dir: str | None = None, config: dict | None = None,
                    max_shard_bytes: int = 4 << 30, overwrite: bool = False) -> None:
    """Write tensors as HF safetensors shards (+ index when more than one), config and tokenizer.

    Tensors are consumed one at a time; at most one shard (max_shard_bytes) is held in memory.
    side_files_dir: folder whose config/tokenizer files are copied; config: a config.json to
    write instead of (or without) a copied one.
    """
    with atomic_dir(out_dir, overwrite) as tmp:
        shard: dict[str, torch.Tensor] = {}
        shard_bytes = 0
        shard_files: list[tuple[str, list[str]]] = []
        total = 0

        def flush():
            nonlocal shard, shard_bytes
            if shard:
                name = f"part-{len(shard_files):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                shard_files.append((name, list(shard)))
            shard, shard_bytes = {}, 0

        for name, tensor in named_tensors:
            if name in shard or any(name in names for _, names in shard_files):
                raise ValueError(f"tensor {name!r} written twice")
            size = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + size > max_shard_bytes:
                flush()
            shard[name] = tensor.detach().to("cpu").contiguous()
            shard_bytes += size
            total += size
        flush()

        if len(shard_files) == 1:
            os.replace(os.path.join(tmp, shard_files[0][0]), os.path.join(tmp, "model.safetensors"))
        else:
            weight_map = {}
            n = len(shard_files)
            for i, (name, names) in enumerate(shard_files):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(os.path.join(tmp, name), os.path.join(tmp, final))
                weight_map.update({t: final for t in names})
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

        if side_files_dir is not None:
            copy_hf_side_files(side_files_dir, tmp)
        if config is not None:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2)


def iter_hf_folder(hf_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """All tensors of an HF folder, one at a time (tests and tools)."""
    with HFReader(hf_dir) as reader:
        for name in sorted(reader.names()):
            yield name, reader(name)
