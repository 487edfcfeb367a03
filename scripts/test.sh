#!/usr/bin/env bash
# The test command (README, CI): installs what the tests need, then runs pytest with any arguments given.
# The web page's test drives a real headless Chromium: Debian's chromium and chromium-driver are installed
# when missing and this runs as root (elsewhere, install them yourself or that one test is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver
    else
        echo "scripts/test.sh: chromium/chromium-driver missing and not root: the browser test will be skipped" >&2
    fi
fi
pip install -e ".[test]"
# Two workers, one test file each (--dist loadfile: a file's module fixtures and the local Slurm cluster stay in
# one process): the serial suite leaves a core idle most of the time (24 min serial, 13 min so, on 2 cores).
# exec: pytest's exit status is the script's (5 when no test was collected).
exec python -m pytest -q -n 2 --dist loadfile "$@"
