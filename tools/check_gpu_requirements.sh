#!/usr/bin/env bash
# Does the GPU image's package set resolve on PyPI for Linux x86-64, CPython 3.12, CUDA wheels?
# Asks pip's resolver without installing anything (a dry run with a JSON report), for
# requirements.txt plus what the Dockerfile's second step adds: the run-time requirements of
# Transformer Engine's PyTorch extension (source only on PyPI, so its own declared requirements,
# read from its sdist's PKG-INFO, stand in for it) and `wheel` (its setup.py imports it).
# Then checks what was picked: the pinned releases, CUDA 13 libraries only.
#
#   bash tools/check_gpu_requirements.sh        # needs the package registry; not part of CI
#
# Run it on a Linux x86-64 machine: pip evaluates environment markers (platform_system,
# platform_machine) on the running machine; python_version comes from a throwaway venv of
# Python 3.12 (PYTHON, default python3.12). Nothing is installed outside that venv ($VENV) and
# $OUT (report.json: pip's report; resolved.txt: name==version of every package picked).
# Local pip configuration (extra indexes, find-links, constraints) is ignored: the question is
# PyPI's answer (INDEX_URL to ask another index). Exit 0: resolves and the checks pass.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.12}
VENV=${VENV:-/tmp/megatron-lead-resolve-venv}
OUT=${OUT:-/tmp/megatron-lead-resolve}
INDEX_URL=${INDEX_URL:-https://pypi.org/simple}
REQUIREMENTS=${REQUIREMENTS:-requirements.txt}   # another file: to try a bump before making it
# glibc of the target: 2.39 is Ubuntu 24.04, the Dockerfile's base. torch and vllm need 2.28, but
# vllm's llguidance 1.7 has x86-64 wheels only for 2.31+ (GLIBC_MINOR=28 shows a RHEL 8 host fails).
GLIBC_MINOR=${GLIBC_MINOR:-39}
rm -rf "$OUT" && mkdir -p "$OUT"

"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null \
    || { echo "check: $PY is not a working Python 3.12 (set PYTHON; the venv's version decides the markers)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# Only what pip is told here: no config files, no index or constraint variables from outside.
clean_pip() {
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT -u PIP_REQUIRE_VIRTUALENV \
        PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip "$@"
}
clean_pip install -q --index-url "$INDEX_URL" --upgrade pip packaging
echo "check: $("$VENV/bin/python" --version), $(clean_pip --version | cut -d' ' -f1-2), glibc 2.$GLIBC_MINOR," \
     "index $INDEX_URL, $(date -u +%Y-%m-%dT%H:%MZ)"

# Transformer Engine's PyTorch extension at the release requirements.txt pins TE to: its sdist's
# declared requirements -> $OUT/te-torch-requires.txt. Its setup.py picks the TE core for the
# CUDA major of the installed torch (cu13 here), whatever core its PKG-INFO names.
OUT="$OUT" INDEX_URL="$INDEX_URL" REQUIREMENTS="$REQUIREMENTS" "$VENV/bin/python" - <<'PY'
import io, os, re, sys, tarfile, urllib.parse, urllib.request
from packaging.requirements import Requirement

out, index = os.environ["OUT"], os.environ["INDEX_URL"].rstrip("/")
te = next(Requirement(line.split("#", 1)[0].strip()) for line in open(os.environ["REQUIREMENTS"])
          if re.match(r"transformer-engine\b", line.split("#", 1)[0].strip()) and "==" in line)
version = str(te.specifier).lstrip("=")
page_url = f"{index}/transformer-engine-torch/"
page = urllib.request.urlopen(page_url, timeout=120).read().decode()
links = re.findall(r'href="([^"#]+/transformer_engine_torch-' + re.escape(version) + r'\.tar\.gz)', page)
if not links:
    sys.exit(f"check: PROBLEM: no sdist transformer_engine_torch-{version}.tar.gz on {index}")
data = urllib.request.urlopen(urllib.parse.urljoin(page_url, links[0]), timeout=300).read()
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    member = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
    info = tar.extractfile(member).read().decode()
requires = [v.strip() for v in re.findall(r"^Requires-Dist:(.*)$", info, re.M)]
print(f"check: transformer-engine-torch {version}: sdist only ({len(data) // 1024} KiB), requires {', '.join(requires)}")
core = re.compile(r"transformer[-_]engine[-_]cu1[23]\b")
with open(os.path.join(out, "te-torch-requires.txt"), "w") as f:
    f.writelines(f"{r}\n" for r in requires if not core.match(r))
    f.write(f"transformer-engine-cu13=={version}\nwheel\n")
PY

# --platform needs --only-binary=:all: (pip cannot build an sdist for another machine), and
# --target keeps pip from looking at what the venv holds. pip takes --platform literally, so every
# manylinux tag a machine with glibc 2.$GLIBC_MINOR accepts is listed.
platforms=()
for minor in $(seq "$GLIBC_MINOR" -1 5); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
set +e
clean_pip install --dry-run --ignore-installed --no-cache-dir --report "$OUT/report.json" --target "$OUT/target" \
    --index-url "$INDEX_URL" --only-binary=:all: "${platforms[@]}" \
    --python-version 3.12 --implementation cp --abi cp312 \
    -r "$REQUIREMENTS" -r "$OUT/te-torch-requires.txt" > "$OUT/pip.log" 2>&1
rc=$?
set -e
if [ $rc -ne 0 ]; then
    { grep -E "^ERROR" "$OUT/pip.log"; sed -n '/conflict is caused by/,/^$/p' "$OUT/pip.log"; } | head -n 30 >&2
    echo "check: DOES NOT RESOLVE (pip exit $rc; full log $OUT/pip.log)" >&2
    exit 1
fi

OUT="$OUT" REQUIREMENTS="$REQUIREMENTS" "$VENV/bin/python" - <<'PY'
"""What the resolver picked, checked against what the GPU image needs."""
import json, os, re, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

out = os.environ["OUT"]
report = json.load(open(os.path.join(out, "report.json")))
picked = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
with open(os.path.join(out, "resolved.txt"), "w") as f:
    f.writelines(f"{n}=={v}\n" for n, v in sorted(picked.items()))
print(f"check: resolves: {len(picked)} packages (list in {out}/resolved.txt)")
for name in ("torch", "vllm", "megatron-core", "transformers", "transformer-engine", "transformer-engine-cu13",
             "triton", "flashinfer-python", "torchvision", "torchaudio", "numpy", "onnx", "wheel"):
    print(f"  {name} {picked.get(name, 'NOT PICKED')}")
cuda = sorted(n for n in picked if n.startswith(("nvidia-", "cuda-")))
print("  CUDA wheels:", ", ".join(f"{n} {picked[n]}" for n in cuda))

problems = []
for line in open(os.environ["REQUIREMENTS"]):
    line = line.split("#", 1)[0].strip()
    if line:
        r = Requirement(line)
        name = canonicalize_name(r.name)
        if name not in picked:
            problems.append(f"{r} was not picked")
        elif not r.specifier.contains(picked[name], prereleases=True):
            problems.append(f"{name} {picked[name]} picked against the requirement {r}")
# torch 2.13.0 and vllm 0.32.0 are CUDA 13 builds: a CUDA 12 copy of a library torch loads would
# clash. (nvidia-cutlass-dsl pulls nvidia-cutlass-dsl-libs-cu12 whatever the CUDA; torch never loads it.)
clash = [n for n in cuda if re.fullmatch(r"nvidia-(cuda-runtime|cuda-nvrtc|cublas|cudnn|nccl|nvjitlink|cusparselt|nvshmem)-cu12", n)]
if clash:
    problems.append("CUDA 12 runtime libraries picked next to torch's CUDA 13 ones: " + ", ".join(clash))
if "nvidia-nccl-cu13" not in picked or "nvidia-cudnn-cu13" not in picked:
    problems.append("torch's CUDA 13 NCCL / cuDNN wheels were not picked: is torch a CUDA 13 build?")
for p in problems:
    print("check: PROBLEM:", p, file=sys.stderr)
print("check: OK" if not problems else f"check: {len(problems)} problem(s)")
sys.exit(1 if problems else 0)
PY
