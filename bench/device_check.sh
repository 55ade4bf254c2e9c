#!/usr/bin/env bash
# The GPU check in one command (bench/README.md, "bench/device_check.py").
#
#   bench/device_check.sh [ARGS...]        on the GPU host: install the wheels in .whl/ (if any) into a private
#                                          folder, check the versions the check relies on, then run
#                                          bench/device_check.py ARGS under a hard time limit
#   bench/device_check.sh --fetch-wheels   on a connected machine: download those wheels into .whl/ (Python 3.12,
#                                          x86-64 Linux), bitsandbytes reduced to its CUDA 13 and CPU libraries
#
# Environment: PYTHON (default python3), EAGLE_DEVICE_CHECK_LIMIT_S (hard limit, default 360 s), OUT (a folder the
# result JSON and the log are copied to at the end, if set). Exit status: the check's (124: the limit was hit; the
# stages finished before it are in the result file all the same).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
WHEELS=.whl
LIMIT="${EAGLE_DEVICE_CHECK_LIMIT_S:-360}"

# What the check imports that a CUDA image with torch/transformers/timm/onnxruntime may lack. The first three are
# the pins of requirements*.txt; pydantic's own dependencies are the versions that pydantic pin was tested with.
pin() { grep -h "^$1==" requirements-base.txt requirements.txt | head -n1 | cut -d= -f3; }
WHEEL_SPECS=(
  "bitsandbytes==$(pin bitsandbytes)"
  "faiss-cpu==$(pin faiss-cpu)"
  "pydantic==$(pin pydantic)"
  "pydantic-core==2.50.5"
  "annotated-types==0.8.0"
  "typing-inspection==0.4.5"
)

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$WHEELS" "${WHEEL_SPECS[@]}" || exit
  # The bitsandbytes wheel (~43 MB) carries a library per CUDA/ROCm/XPU version; a torch built for CUDA 13 loads
  # libbitsandbytes_cuda130.so. Keep the CUDA 13 and CPU ones (a ~7 MB wheel), so that all that travels stays
  # well under the GPU machine's 64 MiB. On your own GPU host, `pip install bitsandbytes` instead.
  "$PYTHON" - "$WHEELS" <<'EOF' || exit
import re, sys, zipfile
from pathlib import Path

for wheel in Path(sys.argv[1]).glob("bitsandbytes-*.whl"):
    drop = re.compile(r"bitsandbytes/libbitsandbytes_(?!cuda13\d|cpu)\w+\.(so|dll|dylib)$")
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if drop.match(item.filename):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines() if not drop.match(line.split(",")[0])]
                data = ("\n".join(lines) + "\n").encode()
            target.writestr(item, data)
    slim.replace(wheel)
EOF
  ls -l "$WHEELS"/*.whl
  du -cb "$WHEELS"/*.whl | tail -n1 | awk '{printf "wheels: %.1f MiB\n", $1 / 1048576}'
  exit 0
fi

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/eagle-site \
    "$WHEELS"/*.whl || exit
  export PYTHONPATH="/tmp/eagle-site${PYTHONPATH:+:$PYTHONPATH}"
fi

# The versions the numbers depend on, and whether what the check needs is there (it runs anyway: a stage that
# cannot run records its error and the next stages still run).
"$PYTHON" - <<'EOF'
import importlib, importlib.metadata as md
for name in ("torch", "transformers", "bitsandbytes", "accelerate", "faiss-cpu", "faiss-gpu-cu12", "onnxruntime",
             "onnxruntime-gpu", "timm", "onnxscript", "pydantic", "tokenizers", "numpy"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
import torch
print("cuda:", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
major, minor = (int(v) for v in md.version("transformers").split(".")[:2])
if (major, minor) < (5, 17):
    print("WARNING: transformers < 5.17: the check was proven with 5.17 and 5.24")
for module in ("bitsandbytes", "faiss", "pydantic", "onnxruntime", "timm", "cv2"):
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001
        print(f"WARNING: cannot import {module}: {type(err).__name__}: {err}")
EOF

mkdir -p bench/results
log="bench/results/device-$(date -u +%Y-%m-%d).log"
timeout --signal=TERM --kill-after=15 "$LIMIT" env PYTHONUNBUFFERED=1 "$PYTHON" bench/device_check.py \
  --budget-s "$((LIMIT - 40))" "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp bench/results/device-"$(date -u +%Y-%m-%d)"*.json "$log" "$OUT"/ 2>/dev/null
fi
exit "$status"
