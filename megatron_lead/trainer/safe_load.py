"""Reading trainer checkpoints without running code found in them.

Why: Megatron's `torch_dist` format is PyTorch's distributed checkpoint, which unpickles three
things with the full pickle machinery: `.metadata` (`FileSystemReader.read_metadata`:
`pickle.load`), byte items in the `.distcp` shards (`DefaultLoadPlanner.load_bytes`:
`torch.load(weights_only=False)`; Megatron stores its `_extra_state` objects that way), and
Megatron's `common.pt` (`torch.load` with the default, which an environment variable can turn
off). A crafted file in any of them runs arbitrary code on load (measured: a `.metadata` whose
`__reduce__` calls `os.system` did).

Two independent guards, so a checkpoint copied from elsewhere cannot run code even when both
its files and its manifest were rewritten:

1. `safe_unpickling()`, active around Megatron's load: `.metadata` goes through
   `MetadataUnpickler`, which admits only the classes a DCP metadata file is made of (an
   allow-list; anything else raises `UnpicklingError`), and every `torch.load` is forced to
   `weights_only=True` (tensors, containers, primitive types only).
2. A SHA-256 manifest (`manifest.json`) of every file of the checkpoint, written at save time
   before `complete.json` and verified before anything is unpickled: damage (a torn copy, bit
   rot, a file from another save) and naive tampering are refused with a one-line error naming
   the file. Hashing is shared out over the ranks (file i goes to rank i mod world).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import types

import torch

MANIFEST_FILE = "manifest.json"
_UNHASHED = (MANIFEST_FILE, "complete.json")  # the manifest itself and the marker written after it

# (module, name) pairs a DCP `.metadata` pickle may name (measured on Megatron 0.16 / torch
# 2.13 checkpoints at TP/PP/DP layouts, plus the planner types torch may add).
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem",
        "LoadItemType"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.serialization": {"_get_layout"},  # a lookup of torch.strided & co. by name
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the allow-listed metadata classes and torch dtypes."""

    def find_class(self, module: str, name: str):
        if "." not in name:
            if name in _METADATA_CLASSES.get(module, ()):
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (not a checkpoint metadata class)")


def restricted_load(file, *args, **kwargs):
    """pickle.load for DCP metadata files: MetadataUnpickler."""
    return MetadataUnpickler(file).load()


@contextlib.contextmanager
def safe_unpickling():
    """Within the block: DCP reads `.metadata` with MetadataUnpickler, and torch.load always
    runs with weights_only=True (common.pt, byte items of the shards, anything else)."""
    from torch.distributed.checkpoint import filesystem

    real_load = torch.load
    real_pickle = filesystem.pickle

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    shim = types.SimpleNamespace(load=restricted_load, loads=lambda b: restricted_load(io.BytesIO(b)),
                                 dump=pickle.dump, dumps=pickle.dumps,
                                 UnpicklingError=pickle.UnpicklingError)
    filesystem.pickle = shim
    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = real_load
        filesystem.pickle = real_pickle


# --------------------------------------------------------------------------- the manifest


def checkpoint_files(folder: str) -> list[str]:
    """Relative paths of every regular file under folder (sorted), manifest and marker excluded."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), folder)
            if rel not in _UNHASHED:
                out.append(rel)
    return sorted(out)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def hash_share(folder: str, files: list[str], rank: int, world: int) -> dict[str, list]:
    """{relpath: [sha256, size]} of this rank's share of files (file i goes to rank i mod world)."""
    return {rel: [sha256_file(os.path.join(folder, rel)), os.path.getsize(os.path.join(folder, rel))]
            for i, rel in enumerate(files) if i % world == rank}


def write_manifest(folder: str, entries: dict[str, list]) -> None:
    """manifest.json (fsynced): {"sha256": {relpath: [hex, size]}}."""
    path = os.path.join(folder, MANIFEST_FILE)
    with open(path, "w") as f:
        json.dump({"sha256": dict(sorted(entries.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(folder: str) -> dict[str, list]:
    """The manifest's entries; ValueError (one line) when it is missing or malformed."""
    path = os.path.join(folder, MANIFEST_FILE)
    try:
        with open(path) as f:
            entries = json.load(f)["sha256"]
    except FileNotFoundError:
        raise ValueError(f"no {MANIFEST_FILE}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{MANIFEST_FILE} is unreadable ({type(e).__name__})") from None
    if not isinstance(entries, dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)
            for v in entries.values()):
        raise ValueError(f"{MANIFEST_FILE} is malformed")
    return entries


def verify_share(folder: str, entries: dict[str, list], rank: int, world: int) -> None:
    """Check this rank's share of the folder against the manifest; ValueError naming the first bad file.

    Every rank also checks that the folder holds exactly the listed files (cheap: a listing), so
    a file added or removed after the save is refused wherever it is read.
    """
    present = checkpoint_files(folder)
    missing = sorted(set(entries) - set(present))
    if missing:
        raise ValueError(f"{missing[0]} is listed in {MANIFEST_FILE} but missing")
    extra = sorted(set(present) - set(entries))
    if extra:
        raise ValueError(f"{extra[0]} is not listed in {MANIFEST_FILE}")
    for i, rel in enumerate(sorted(entries)):
        if i % world != rank:
            continue
        digest, size = entries[rel]
        path = os.path.join(folder, rel)
        if os.path.getsize(path) != size or sha256_file(path) != digest:
            raise ValueError(f"{rel} does not match its SHA-256 in {MANIFEST_FILE}")
