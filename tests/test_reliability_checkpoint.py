"""Checkpoints under faults: tampered files never run code, a full disk never costs the previous
checkpoint (trainer/checkpoint.py, trainer/safe_load.py).

One spawn saves steps 1 and 2 of a tiny Megatron Qwen2 (CPU fp32), then tries to save step 3 on
a "full" disk (the DCP shard writer, then the manifest writer, raise ENOSPC part-way); the
parent builds tampered copies of step 2, each carrying a pickle whose __reduce__ would
`touch` a canary file, and one with a weight's bytes flipped in place (same size); a second spawn
loads every copy. About 30-40 s on 2 cores.
"""

import errno
import functools
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_lead.launch import run_local

pytestmark = pytest.mark.slow


def _tc():
    import test_trainer_checkpoint as tc  # the tiny model and step of the checkpoint tests

    return tc


class _Evil:
    """Unpickling this runs `touch path` (a shell command)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def evil_pickle(path) -> bytes:
    return pickle.dumps(_Evil(path), protocol=2)


def _full_disk_writer(real, after: int):
    """DCP's _write_item that writes `after` items, then part of one, then fails with ENOSPC."""
    count = [0]

    @functools.wraps(real)  # Megatron inspects its signature
    def write_item(transforms, stream, data, write_item, *args, **kwargs):
        count[0] += 1
        if count[0] > after:
            stream.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return real(transforms, stream, data, write_item, *args, **kwargs)

    return write_item


def _save_and_fill_the_disk(rank, world, paths):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_lead.trainer import checkpoint as ckpt
    from megatron_lead.trainer import safe_load

    tc = _tc()
    model, optimizer, scheduler = tc._build(1, paths["tp1"], paths["hf"])
    out = {}
    for step in (1, 2):
        tc._step(model, optimizer, scheduler, seed=step)
        ckpt.save_checkpoint(paths["root"], step, model, optimizer, scheduler, {"step": step}, keep_last=3)
        out[f"weights{step}"] = tc._weights(model)
    tc._step(model, optimizer, scheduler, seed=3)
    real_item, real_manifest = filesystem_async._write_item, safe_load.write_manifest

    def half_manifest(folder, entries):
        with open(os.path.join(folder, safe_load.MANIFEST_FILE), "w") as f:
            f.write('{"sha256": {')
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    out["full_disk"] = {}
    for where in ("shards", "manifest"):
        if where == "shards":
            filesystem_async._write_item = _full_disk_writer(real_item, after=3)
        else:
            safe_load.write_manifest = half_manifest
        try:
            ckpt.save_checkpoint(paths["root"], 3, model, optimizer, scheduler, {"step": 3}, keep_last=3)
            out["full_disk"][where] = None
        except OSError as e:
            out["full_disk"][where] = str(e)
        finally:
            filesystem_async._write_item, safe_load.write_manifest = real_item, real_manifest
        out.setdefault("listing", {})[where] = sorted(os.listdir(paths["root"]))
    out["latest"] = ckpt.latest_checkpoint(paths["root"])
    return out


def _load_all(rank, world, paths, cases):
    from megatron_lead.trainer import checkpoint as ckpt

    tc = _tc()
    out = {}
    for name in ["good"] + [c for c in cases if c != "good"]:
        model, optimizer, scheduler = tc._build(1, None, paths["hf"])
        try:
            state = ckpt.load_checkpoint(cases[name], model, optimizer, scheduler)
            out[name] = ("loaded", state, tc._weights(model))
        except (FileNotFoundError, ValueError) as e:
            out[name] = (type(e).__name__, str(e), None)
    return out


def _rehash(folder):
    """Rewrite the manifest to match the tampered files (an attacker who knows the format)."""
    from megatron_lead.trainer import safe_load

    files = safe_load.checkpoint_files(folder)
    safe_load.write_manifest(folder, safe_load.hash_share(folder, files, 0, 1))


def _byte_item(folder):
    """(shard file, offset, length) of one byte item (a pickled object) in the shards."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_lead.trainer.safe_load import MetadataUnpickler

    with open(os.path.join(folder, ".metadata"), "rb") as f:
        md = MetadataUnpickler(f).load()
    for index, info in md.storage_data.items():
        if isinstance(md.state_dict_metadata[index.fqn], BytesStorageMetadata):
            return info.relative_path, info.offset, info.length
    raise AssertionError("no byte item in this checkpoint")


def _tensor_item(folder, fqn_part="embedding.word_embeddings.weight"):
    """(shard file, offset, length) of a stored weight tensor in the shards."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_lead.trainer.safe_load import MetadataUnpickler

    with open(os.path.join(folder, ".metadata"), "rb") as f:
        md = MetadataUnpickler(f).load()
    for index, info in md.storage_data.items():
        if fqn_part in index.fqn and isinstance(md.state_dict_metadata[index.fqn], TensorStorageMetadata):
            return info.relative_path, info.offset, info.length
    raise AssertionError(f"no tensor {fqn_part} in this checkpoint")


def _flip_bits(folder):
    """Invert 16 bytes (4 fp32 values) in the middle of the stored embedding, in place: the
    shard keeps its size, so only its content tells."""
    shard, offset, length = _tensor_item(folder)
    path = os.path.join(folder, shard)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(offset + length // 2)
        data = f.read(16)
        f.seek(offset + length // 2)
        f.write(bytes(b ^ 0xFF for b in data))
    assert os.path.getsize(path) == size


def _tamper(good, root, canary):
    """Copies of the good checkpoint, each with one hostile or damaged file."""
    cases = {"good": good}

    def copy(name):
        path = str(root / name / "step_00000002")
        shutil.copytree(good, path)
        cases[name] = path
        return path

    payload = evil_pickle(canary)
    p = copy("metadata_manifest_kept")
    open(os.path.join(p, ".metadata"), "wb").write(payload)
    for name, rel in (("metadata_rehashed", ".metadata"), ("common_rehashed", "common.pt"),
                      ("rng_rehashed", os.path.join("rng", "rank0.pt"))):
        p = copy(name)
        open(os.path.join(p, rel), "wb").write(payload)
        _rehash(p)
    p = copy("shard_item_rehashed")
    shard, offset, length = _byte_item(p)
    assert len(payload) <= length
    with open(os.path.join(p, shard), "r+b") as f:
        f.seek(offset)
        f.write(payload + b"\0" * (length - len(payload)))
    _rehash(p)
    p = copy("state_edited")  # valid JSON, another step: only the manifest can tell
    json.dump({"step": 7}, open(os.path.join(p, "trainer_state.json"), "w"))
    p = copy("extra_file")
    open(os.path.join(p, "__9_0.distcp"), "wb").write(payload)
    p = copy("legacy_format_hostile")  # format 1 (before manifests): the safe loaders alone
    os.remove(os.path.join(p, "manifest.json"))
    marker = json.load(open(os.path.join(p, "complete.json")))
    json.dump({**marker, "format": 1}, open(os.path.join(p, "complete.json"), "w"))
    open(os.path.join(p, ".metadata"), "wb").write(payload)
    p = copy("no_manifest")
    os.remove(os.path.join(p, "manifest.json"))
    _flip_bits(copy("weight_bits_flipped"))
    p = copy("weight_bits_flipped_rehashed")  # control: the flipped bytes are a live weight
    _flip_bits(p)
    _rehash(p)
    return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import transformers

    from megatron_lead.policy.convert.checkpoint import hf_to_megatron

    tc = _tc()
    root = tmp_path_factory.mktemp("reliability_ckpt")
    paths = {k: str(root / k) for k in ("hf", "tp1", "root")}
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(tc._hf_config()).save_pretrained(paths["hf"])
    hf_to_megatron(paths["hf"], paths["tp1"], tp=1)
    saved = run_local(_save_and_fill_the_disk, 1, paths)[0]
    canary = root / "canary"
    cases = _tamper(os.path.join(paths["root"], "step_00000002"), root, canary)
    loaded = run_local(_load_all, 1, paths, cases)[0]
    return dict(root=root, paths=paths, saved=saved, cases=cases, loaded=loaded, canary=canary)


def test_the_payload_is_live(runs, tmp_path):
    """Without the guards, the crafted .metadata runs its command: the test's payload bites."""
    canary = tmp_path / "live"
    folder = tmp_path / "ckpt"
    shutil.copytree(runs["cases"]["good"], folder)
    (folder / ".metadata").write_bytes(evil_pickle(canary))
    code = ("import sys; from torch.distributed.checkpoint import FileSystemReader; "
            "FileSystemReader(sys.argv[1]).read_metadata()")
    subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, timeout=120)
    assert canary.exists()


def test_hostile_and_damaged_checkpoints_are_refused_with_one_line(runs):
    loaded, cases = runs["loaded"], runs["cases"]
    assert loaded["good"][0] == "loaded" and loaded["good"][1] == {"step": 2}
    for name, (kind, message, _) in loaded.items():
        if name in ("good", "weight_bits_flipped_rehashed"):
            continue
        assert kind == "ValueError", (name, kind, message)
        assert "\n" not in message and cases[name] in message, (name, message)
    assert not runs["canary"].exists()  # nothing ran
    why = {name: loaded[name][1] for name in cases if name != "good"}
    for name in ("metadata_manifest_kept", "state_edited", "weight_bits_flipped"):
        assert "does not match its SHA-256" in why[name], why[name]
    assert "__9_0.distcp is not listed" in why["extra_file"]
    assert "no manifest.json" in why["no_manifest"]
    assert "refused to load posix.system" in why["metadata_rehashed"]
    assert "refused to load posix.system" in why["legacy_format_hostile"]
    for name in ("common_rehashed", "rng_rehashed", "shard_item_rehashed"):
        assert "Weights only load failed" in why[name], why[name]


def test_flipped_weight_bits_of_the_same_size_are_refused(runs):
    """A shard whose bytes changed but not its size (bit rot, a bad copy) is refused by its
    SHA-256: the sizes in the manifest all still match. The control copy, the same flip with a
    rewritten manifest, loads, and one weight, the embedding, differs from the saved one."""
    kind, message, _ = runs["loaded"]["weight_bits_flipped"]
    assert kind == "ValueError" and "corrupt or was modified" in message
    assert ".distcp does not match its SHA-256" in message and "\n" not in message
    kind, _, weights = runs["loaded"]["weight_bits_flipped_rehashed"]
    saved = runs["saved"]["weights2"]
    assert kind == "loaded"
    assert [k for k in saved if not torch.equal(weights[k], saved[k])] == ["model.embed_tokens.weight"]


def test_the_good_copy_loads_the_saved_weights(runs):
    weights = runs["loaded"]["good"][2]
    saved = runs["saved"]["weights2"]
    assert weights.keys() == saved.keys()
    assert all(torch.equal(weights[k], saved[k]) for k in saved)


def test_a_full_disk_keeps_the_previous_checkpoint(runs):
    saved = runs["saved"]
    for where, error in saved["full_disk"].items():
        assert error is not None and "No space left on device" in error and "\n" not in error, where
        assert saved["listing"][where] == ["step_00000001", "step_00000002"], where
    assert saved["latest"].endswith("step_00000002")
    with open(os.path.join(saved["latest"], "manifest.json")) as f:
        assert ".metadata" in json.load(f)["sha256"]
