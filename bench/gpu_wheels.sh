#!/usr/bin/env bash
# Fetch what the GPU machine lacks for bench/gpu_check.py into bench/gpu_wheels/ (git-ignored):
#   diffusers 0.42.1 (pure Python) with requests and its dependencies, bitsandbytes 0.50.2 trimmed
#   to the CUDA 13.0 and CPU libraries (the full wheel holds one library per CUDA version, 43 MB),
#   and xformers 0.0.35 (built on PyTorch's stable ABI, for torch >= 2.10) unless NO_XFORMERS=1.
# Then checks that the working tree plus the wheels stay under the 64 MiB that travel.
#
#   bash bench/gpu_wheels.sh            # run on a machine that reaches PyPI
#
# docs/training.md ("Running the GPU check") says how to install them on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=bench/gpu_wheels
CUDA=${CUDA_VERSION_TAG:-130}     # libbitsandbytes_cuda130.so matches torch +cu130
LIMIT=$((64 * 1024 * 1024))
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
PACKAGES=(diffusers==0.42.1 bitsandbytes==0.50.2)
[ "${NO_XFORMERS:-0}" = 1 ] || PACKAGES+=(xformers==0.0.35)
# diffusers' pipelines import requests, which the GPU machine's packages do not need (small wheels).
SUPPORT=(requests==2.34.2 urllib3==2.8.0 idna==3.20 charset-normalizer==3.5.3 certifi==2026.10.19.post1)

FULL=$(mktemp -d)
trap 'rm -rf "$FULL"' EXIT
rm -rf "$DEST"
mkdir -p "$DEST"
for package in "${PACKAGES[@]}" "${SUPPORT[@]}"; do
    python -m pip download --quiet --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$FULL" "$package"
done
find "$FULL" -name '*.whl' ! -name 'bitsandbytes-*' -exec mv {} "$DEST"/ \;

# bitsandbytes: the same wheel without the libraries of other CUDA versions (RECORD rewritten, so
# pip installs it as usual).
python - "$FULL"/bitsandbytes-*.whl "$DEST" "$CUDA" <<'PY'
import re
import sys
import zipfile
from pathlib import Path

source, dest, cuda = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda})\.so$")
with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest / source.name, "w", zipfile.ZIP_DEFLATED) as zout:
    dropped = [n for n in zin.namelist() if re.search(r"libbitsandbytes_\w+\.so$", n) and not keep.search(n)]
    kept = [n for n in zin.namelist() if re.search(r"libbitsandbytes_\w+\.so$", n) and keep.search(n)]
    if not any(f"cuda{cuda}" in n for n in kept):
        sys.exit(f"{source.name} has no libbitsandbytes_cuda{cuda}.so")
    for item in zin.infolist():
        if item.filename in dropped:
            continue
        data = zin.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if l.split(",")[0] not in dropped) + "\n").encode()
        zout.writestr(item, data)
print(f"bitsandbytes: kept {', '.join(Path(n).name for n in kept)}; left out {len(dropped)} other CUDA libraries")
PY

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
for wheel in "$DEST"/*.whl; do
    echo "$(basename "$wheel"): $(mib "$(stat -c %s "$wheel")")"
done
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 stat -c %s 2>/dev/null \
        | awk '{ s += $1 } END { print s + 0 }')
wheels=$(du -sb "$DEST" | cut -f1)
total=$((tree + wheels))
echo "working tree $(mib "$tree") + wheels $(mib "$wheels") = $(mib "$total") (limit $(mib "$LIMIT"))"
if [ "$total" -ge "$LIMIT" ]; then
    echo "too large to travel: leave xformers out (NO_XFORMERS=1)" >&2
    exit 1
fi
