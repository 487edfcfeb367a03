#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): one call on a GPU machine, a table at the end.
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--cpu-smoke] [--total-s 480]
# Packages the GPU machine lacks (deepspeed, webdataset, open_clip, omegaconf, ...) travel as wheels in .whl/
# (made here by benchmarks/gpu_wheels.sh) and are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import deepspeed, webdataset, open_clip, omegaconf" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "error: installing the carried wheels in .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="/tmp/site/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py "$@"
