#!/usr/bin/env bash
# Fill .whl/ with the wheels the GPU machine lacks (it has torch, transformers, numpy, tensorboard, peft, ...;
# the device tool's KINDS.md lists them), for its Python 3.12 on x86-64. Run here, once, before the GPU call:
#   bash benchmarks/gpu_wheels.sh && echo /.whl/ >> .git/info/exclude
# then call the device with carry [".whl"] and `bash benchmarks/gpu_check.sh "$OUT"`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# The versions installed here, so both machines run the same code; pure-Python ones fit any platform.
PACKAGES=(deepspeed hjson pydantic pydantic_core annotated-types typing-inspection webdataset braceexpand
          open_clip_torch ftfy wcwidth omegaconf antlr4-python3-runtime fastapi starlette uvicorn)
for name in "${PACKAGES[@]}"; do
    version=$(python3 -m pip show "$name" 2>/dev/null | sed -n "s/^Version: //p" || true)
    spec="$name${version:+==$version}"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$spec" 2>/dev/null \
        || python3 -m pip wheel -q --no-deps -w .whl "$spec"   # sdist-only (deepspeed): a pure-Python wheel
done
du -sh .whl
