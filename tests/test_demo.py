"""The quickstart demo end to end (--fast, the default methods): MemVP must answer from the images.

The bar is the quickstart's (docs/quickstart.md): MemVP at least 90% overall and 80% on every question type,
the text-only control at most 45% (near chance), the input-space baseline clearly above the control. APT, DVP
and DAS (`--all`) are left out to keep the suite short: their searches and runs are covered by
tests/test_search.py and the model tests.
"""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_demo_fast_shows_memvp_uses_images(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "memvp_demo.demo", "--fast", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"memvp", "input_prefix", "text_only", "chance"}
    memvp, prefix, control = results["memvp"], results["input_prefix"], results["text_only"]
    assert memvp["acc/overall"] >= 90, memvp
    for category in ("colour", "shape", "position"):
        assert memvp[f"acc/{category}"] >= 80, (category, memvp)
        # the control sits near chance on questions that need the image
        assert control[f"acc/{category}"] <= 50, (category, control)
    assert control["acc/overall"] <= 45, control
    # 15 points is about four standard errors of a 200-question accuracy
    assert prefix["acc/overall"] >= control["acc/overall"] + 15, (prefix, control)
    assert (out / "demo.png").stat().st_size > 10_000
    table = (out / "results.txt").read_text()
    assert all(name in table for name in ("memvp", "input_prefix", "text_only", "chance"))
    for name in ("memvp", "input_prefix", "text_only"):
        assert list((out / name / "tb").glob("events.out.tfevents.*"))
        assert (out / name / "export" / "trainable.safetensors").is_file()
    assert "OK: MemVP" in proc.stdout and "stage times:" in proc.stdout
