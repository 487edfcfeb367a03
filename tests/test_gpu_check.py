"""The prepared GPU check runs end to end before any GPU is used: its CPU smoke run finishes every stage that
can run on a CPU (the server benchmark's smoke test is its serve stage) and writes the JSON and the table;
the roofline arithmetic matches a hand count."""

import json
import math
import subprocess

from tests.helpers import REPO


def test_cpu_smoke_run_writes_every_stage_and_the_table(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path), "--cpu-smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["pytest_gpu", "speed", "packing", "trainer", "roofline", "serve"]
    assert stages["pytest_gpu"]["status"] == "skipped" and stages["pytest_gpu"]["skipped"] > 0  # no CUDA here
    for name in ("speed", "packing", "trainer", "roofline", "serve"):
        assert stages[name]["status"] == "ok", (name, stages[name])
    for zero in ("zero2", "zero3"):  # the real trainer under both ZeRO stages, read back from TensorBoard
        run = stages["trainer"]["results"][zero]
        assert run["status"] == "ok" and run["train/tokens_per_s"] > 0 and 0 < run["train/mfu"] < 1, run
    packed = stages["packing"]["results"]["sdpa"]["memvp"]
    assert packed["packed"]["rows"] < packed["padded"]["rows"]
    # The server benchmark: bounded loopback load, one row per concurrency, TTFT within the latency.
    serve = stages["serve"]["results"]
    rows = serve["memvp"]["concurrency"]
    assert set(rows) == {"1", "2"} and serve["memvp"]["peak_memory_gb"] > 0
    assert [row["requests"] for row in rows.values()] == [1, 2]
    for row in rows.values():
        assert all(math.isfinite(v) and v > 0 for v in row.values()), row
        assert row["ttft_p50_s"] <= row["latency_p50_s"]
    assert "throughput_c2_over_c1" in serve["ratios"]["memvp"]
    headline = report["headline"]
    assert all(math.isfinite(headline[k]) for k in ("train step, memvp / input_prefix", "decode share of HBM roofline",
                                                    "MFU memvp (ZeRO-2 trainer)", "packed / padded train tokens/s"))
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| trainer | ok |" in table and "| zero3 | ok |" in table and report["commit"] in table


def test_decode_roofline_bytes_match_a_hand_count():
    from benchmarks.gpu_check import decode_bytes_per_step

    # cpu-small, 2 layers, fp32: hidden 256, intermediate 688, vocab 1000, batch 2, 64 text tokens, 8 new
    # tokens (context 64 + 4 on average), 64 visual tokens (input_prefix), 80 memory rows (memvp).
    weights = 2 * (4 * 256 * 256 + 3 * 256 * 688) + 1000 * 256
    kv_text = 2 * 2 * 2 * 256 * 68
    assert decode_bytes_per_step("cpu-small", "memvp", 2) == 4 * (weights + kv_text + 2 * 2 * 2 * 80 * 256)
    assert decode_bytes_per_step("cpu-small", "input_prefix", 2) == 4 * (weights + kv_text + 2 * 2 * 2 * 256 * 64)
