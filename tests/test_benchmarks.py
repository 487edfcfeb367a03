"""The benchmark scripts run at a reduced size and write every field they promise."""

import json
import math
import subprocess
import sys

from tests.helpers import REPO


def test_speed_benchmark_cpu_small_writes_all_fields(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "benchmarks/speed.py",
                           "--peak-tflops", "1", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    fields = {"train_step_s", "train_tokens_per_s", "prefill_s", "decode_ms_per_token", "peak_memory_gb", "mfu"}
    for name in ("memvp", "input_prefix", "ratio_memvp_over_input_prefix"):
        assert set(result[name]) == fields
        assert all(math.isfinite(v) and v > 0 for v in result[name].values()), result[name]
    assert "train_step_s" in proc.stdout
    # 64 visual tokens double the input-space sequence; MemVP's per-layer memory costs far less.
    assert result["ratio_memvp_over_input_prefix"]["train_step_s"] < 0.9


def test_extract_benchmark_reports_each_stage(tmp_path):
    out = tmp_path / "extract.json"
    proc = subprocess.run([sys.executable, "benchmarks/extract.py", "--images", "40", "--workers", "1",
                           "--source-size", "64", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["images"] == 40
    assert all(result[k] > 0 for k in ("decode_images_per_s", "model_images_per_s", "end_to_end_images_per_s"))
