"""The one prepared GPU check: every GPU measurement of the project in one call, each stage within its own
time budget, always ending with a table.

    bash benchmarks/gpu_check.sh "$OUT"              # on one H100/H200 (about 8 minutes)
    bash benchmarks/gpu_check.sh /tmp/gc --cpu-smoke  # the same stages at tiny shapes on a CPU (about 2 minutes)

Stages (each a subprocess; a stage whose budget cannot fit in what is left of the total is reported as
skipped, one that overruns is killed and reported as timed out, and the rest still run):

  pytest_gpu  ``pytest -m gpu``: bf16 numerics, cached decode, packed rows under flex attention (and FA2)
  speed       benchmarks/speed.py at LLaMA-13B layer shapes (4 layers, bf16): train step, prefill, decode,
              peak memory, ratios to input_prefix
  packing     benchmarks/packing.py at 13B shapes: padded vs packed, with sdpa and with flex attention
  trainer     memvp-train itself at 13B layer shapes (random weights, 4 layers, ViT-L-shaped features from a
              random CLIP) for 30 steps under ZeRO-2 and ZeRO-3: tokens/s, MFU, peak memory (TensorBoard)
  roofline    decode's share of the HBM roofline for memvp and input_prefix (from the speed stage)
  serve       benchmarks/serve.py at 13B layer shapes, when the server exists

Writes ``gpu_check.json`` and ``gpu_check.md`` (the table, with the issue's targets beside the figures) to the
output folder. Exit status 0 when every stage that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.speed import PRESETS  # noqa: E402

# Bytes/s of HBM by a substring of the device name (vendor figures; the H200 copies ~4.3 TB/s in practice).
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "H800": 3.35e12, "A100": 2.0e12}
NOMINAL_CPU_BYTES_PER_S = 20e9
# The targets at LLaMA-13B shapes: reported beside the figures, never asserted.
TARGETS = {
    "train step, memvp / input_prefix": "<= 0.55",
    "prefill, memvp / input_prefix": "<= 0.50",
    "decode, memvp / input_prefix": "<= 1.0",
    "MFU memvp (ZeRO-2 trainer)": ">= 45%",
    "decode share of HBM roofline": ">= 50%",
    "packed / padded train tokens/s": ">= 1.5x",
}


@dataclass
class Shapes:
    """What differs between the GPU check and its CPU smoke run."""

    preset: str
    speed_args: List[str]
    packing_args: List[str]
    packing_backends: List[str]
    clip_args: List[str]
    llm: Dict[str, int]
    visual: Dict[str, int]
    train_steps: int
    micro_batch: int
    budgets: Dict[str, int] = field(default_factory=dict)


GPU = Shapes(
    preset="llama13b",
    speed_args=["--preset", "llama13b", "--layers", "4"],
    packing_args=["--preset", "llama13b", "--layers", "4", "--micro-batches", "2", "--repeats", "3"],
    packing_backends=["sdpa", "flex_attention"],
    clip_args=["--clip-model", "ViT-L-14", "--clip-pretrained", "random", "--image-size", "224", "--device", "cuda"],
    llm={"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 4, "num_attention_heads": 40,
         "num_key_value_heads": 40, "vocab_size": 32000},
    visual={"visual_dim": 1024, "visual_tokens": 256, "memory_rows": 400},
    train_steps=30,
    micro_batch=4,
    budgets={"pytest_gpu": 60, "speed": 150, "packing": 90, "trainer": 150, "roofline": 5, "serve": 60},
)
SMOKE = Shapes(
    preset="cpu-small",
    speed_args=["--preset", "cpu-small", "--repeats", "1", "--layers", "2", "--variants", "memvp", "input_prefix"],
    packing_args=["--preset", "cpu-small", "--layers", "2", "--micro-batches", "1", "--repeats", "1",
                  "--micro-batch", "4", "--max-seq-len", "256"],
    # flex attention has no backward on CPU (torch raises NotImplementedError): the smoke run uses sdpa only.
    packing_backends=["sdpa"],
    clip_args=["--clip-model", "tiny-vit", "--clip-pretrained", "random", "--image-size", "64"],
    llm={"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 512},
    visual={"visual_dim": 32, "visual_tokens": 16, "memory_rows": 24},
    train_steps=4,
    micro_batch=4,
    budgets={"pytest_gpu": 60, "speed": 60, "packing": 60, "trainer": 150, "roofline": 5, "serve": 60},
)


class Check:
    """Runs the stages in order against one deadline and keeps each stage's outcome."""

    def __init__(self, out: Path, shapes: Shapes, total_s: float, smoke: bool):
        self.out, self.shapes, self.smoke = out, shapes, smoke
        self.deadline = time.monotonic() + total_s
        self.stages: Dict[str, Dict] = {}
        self.work = out / "work"
        self.work.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage(self, name: str, fn: Callable[[float], Dict]) -> None:
        budget = min(self.shapes.budgets[name], self.left())
        if budget < min(20, self.shapes.budgets[name]):
            self.stages[name] = {"status": "skipped", "reason": f"{self.left():.0f} s left of the total budget"}
            print(f"[{name}] skipped: out of time", flush=True)
            return
        print(f"[{name}] budget {budget:.0f} s", flush=True)
        start = time.monotonic()
        try:
            result = fn(budget)
        except subprocess.TimeoutExpired as e:
            result = {"status": "timeout", "reason": f"over its {budget:.0f} s budget: {' '.join(map(str, e.cmd))[:200]}"}
        except StageFailed as e:
            result = {"status": "failed", "reason": str(e)}
        result.setdefault("status", "ok")
        result["seconds"] = round(time.monotonic() - start, 1)
        self.stages[name] = result
        print(f"[{name}] {result['status']} in {result['seconds']} s", flush=True)

    def run(self, cmd: List[str], timeout: float, log_name: str) -> str:
        """A command of the check; its output goes to work/<log_name>.log and is returned."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "PYTHONUNBUFFERED": "1"}
        log = self.work / f"{log_name}.log"
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        text = log.read_text(errors="replace")
        if proc.returncode != 0:
            tail = " | ".join(line for line in text.strip().splitlines()[-3:])
            raise StageFailed(f"`{' '.join(cmd[:4])} ...` exited {proc.returncode}: {tail[-400:]}")
        return text


class StageFailed(Exception):
    pass


# -- stages ------------------------------------------------------------------------------------------------------
def pytest_gpu(check: Check, budget: float) -> Dict:
    try:
        text = check.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                          "tests/test_gpu.py"], budget, "pytest_gpu")
    except StageFailed as e:
        return {"status": "failed", "reason": str(e)}
    summary = text.strip().splitlines()[-1] if text.strip() else ""
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    status = "ok" if counts.get("passed") else "skipped"
    return {"status": status, "summary": summary, **counts,
            **({"reason": "no CUDA device: the gpu tests skip"} if status == "skipped" else {})}


def speed(check: Check, budget: float) -> Dict:
    out = check.work / "speed.json"
    check.run([sys.executable, "benchmarks/speed.py", *check.shapes.speed_args, "--json", str(out)], budget, "speed")
    return {"results": json.loads(out.read_text())}


def packing(check: Check, budget: float) -> Dict:
    results, per_backend = {}, budget / len(check.shapes.packing_backends)
    for backend in check.shapes.packing_backends:
        out = check.work / f"packing-{backend}.json"
        try:
            check.run([sys.executable, "benchmarks/packing.py", *check.shapes.packing_args, "--attn", backend,
                       "--variants", "memvp", "input_prefix", "--json", str(out)], per_backend, f"packing-{backend}")
            results[backend] = json.loads(out.read_text())
        except (StageFailed, subprocess.TimeoutExpired) as e:
            results[backend] = {"error": str(e)[:400]}
    if not any("error" not in r for r in results.values()):
        return {"status": "failed", "reason": "; ".join(r["error"] for r in results.values()), "results": results}
    return {"results": results}


def _prepare_trainer_data(check: Check, timeout: float) -> Dict[str, str]:
    data = check.work / "trainer_data"
    steps = check.shapes.train_steps * check.shapes.micro_batch
    prep = [sys.executable, "-m", "data_prep.cli"]
    if not (data / "shards" / "manifest.json").exists():
        check.run([*prep, "synthetic", str(data / "sqa"), "--num-train", str(steps + 8), "--num-val", "8",
                   "--num-test", "8", "--image-size", "224"], timeout, "trainer-synthetic")
        check.run([*prep, "extract", "--source", "scienceqa", "--root", str(data / "sqa"), "--out",
                   str(data / "shards"), *check.shapes.clip_args, "--samples-per-shard", str(steps + 8)],
                  timeout, "trainer-extract")
        check.run([*prep, "tokenizer", "--source", "scienceqa", "--root", str(data / "sqa"), "--out",
                   str(data / "tokenizer")], timeout, "trainer-tokenizer")
    return {"shards": str(data / "shards"), "tokenizer": str(data / "tokenizer")}


def _last_scalars(tb_dir: Path) -> Dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    wanted = ("train/tokens_per_s", "train/samples_per_s", "train/mfu", "mem/max_allocated_gb", "train/loss")
    # The first logged window includes compilation and warm-up: report the last one.
    return {tag: acc.Scalars(tag)[-1].value for tag in wanted if tag in acc.Tags()["scalars"]}


def trainer(check: Check, budget: float) -> Dict:
    start = time.monotonic()
    data = _prepare_trainer_data(check, budget)
    s = check.shapes
    llm = {"model_type": "llama", "max_position_embeddings": 2048, "bos_token_id": 0, "eos_token_id": 1,
           "pad_token_id": 3, **s.llm}
    from memvp_ds.data.tokenizer import load_tokenizer

    llm["vocab_size"] = max(llm["vocab_size"], len(load_tokenizer(data["tokenizer"])))
    precision = ["model.llm.dtype=float32", "train.precision=fp32"] if check.smoke else \
        ["model.llm.dtype=bfloat16", "train.precision=bf16"]
    results = {}
    for zero in ("zero2", "zero3"):
        left = budget - (time.monotonic() - start)
        if left < 15:
            results[zero] = {"status": "skipped", "reason": "out of stage budget"}
            continue
        out = check.work / f"trainer-{zero}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
               str(29500 + (3 if zero == "zero3" else 2)), "-m", "memvp_ds.train", "--config", "tiny_memvp",
               f"model.llm.config={json.dumps(llm)}", *precision,
               f"model.visual_dim={s.visual['visual_dim']}", f"model.visual_tokens={s.visual['visual_tokens']}",
               f"model.memvp.memory_rows={s.visual['memory_rows']}", "model.projector.output_scale=0.01",
               f"data.shards={data['shards']}", f"data.tokenizer={data['tokenizer']}", "data.max_seq_len=512",
               f"train.micro_batch_size={s.micro_batch}", f"train.max_steps={s.train_steps}",
               f"train.ds_config={zero}", f"train.output_dir={out}", "train.save_interval=100000",
               "train.resume=never", "eval.interval=0", f"logging.log_interval={max(s.train_steps // 3, 1)}",
               *([] if not check.smoke else ["logging.peak_tflops=1"])]
        try:
            check.run(cmd, left, f"trainer-{zero}")
            results[zero] = {"status": "ok", **_last_scalars(out / "tb")}
        except (StageFailed, subprocess.TimeoutExpired) as e:
            results[zero] = {"status": "failed", "reason": str(e)[:400]}
    failed = [z for z, r in results.items() if r["status"] == "failed"]
    return {"status": "failed" if failed else "ok", "results": results,
            **({"reason": f"{', '.join(failed)} failed"} if failed else {})}


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def decode_bytes_per_step(preset_name: str, variant: str, layers: int) -> float:
    """HBM bytes one batched decode step must read: every computed weight once (bf16), the KV cache of the
    whole context for each row, and MemVP's per-layer memory (K and V of M rows) for each row."""
    p = PRESETS[preset_name]
    bytes_per = 2 if p.dtype in ("bfloat16", "float16") else 4
    attention = 4 * p.hidden * p.hidden
    weights = layers * (attention + 3 * p.hidden * p.intermediate) + p.vocab * p.hidden  # + the LM head
    context = p.text_tokens + p.new_tokens / 2 + (p.visual_tokens if variant == "input_prefix" else 0)
    kv = p.batch * layers * 2 * p.hidden * context
    memory = p.batch * layers * 2 * p.memory_rows * p.hidden if variant == "memvp" else 0
    return bytes_per * (weights + kv + memory)


def roofline(check: Check, budget: float) -> Dict:
    speed_stage = check.stages.get("speed", {})
    if speed_stage.get("status") != "ok":
        return {"status": "skipped", "reason": "needs the speed stage's decode times"}
    name = _device_name()
    bandwidth = next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)
    if bandwidth is None and check.smoke:
        bandwidth = NOMINAL_CPU_BYTES_PER_S  # exercises the arithmetic; the share means nothing on a CPU
    if bandwidth is None:
        return {"status": "skipped", "reason": f"no HBM bandwidth known for '{name}'"}
    layers = int(check.shapes.speed_args[check.shapes.speed_args.index("--layers") + 1])
    results = {}
    for variant in ("memvp", "input_prefix"):
        measured = speed_stage["results"][variant]["decode_ms_per_token"] / 1000
        ideal = decode_bytes_per_step(check.shapes.preset, variant, layers) / bandwidth
        results[variant] = {"decode_ms_per_step": 1000 * measured, "roofline_ms_per_step": 1000 * ideal,
                            "share": ideal / measured}
    return {"results": results, "hbm_bytes_per_s": bandwidth}


def serve(check: Check, budget: float) -> Dict:
    script = REPO / "benchmarks" / "serve.py"
    # One server subprocess per strategy: at 13B layer shapes, bf16, with TTFT at concurrency 1, 4 and 16.
    out = check.work / "serve.json"
    preset = ["--preset", check.shapes.preset, "--device", "cuda", "--concurrency", "1", "4", "16"] \
        if not check.smoke else ["--preset", "cpu-small", "--strategies", "memvp", "--concurrency", "1", "2",
                                 "--requests", "1", "--max-tokens", "2"]
    check.run([sys.executable, str(script), *preset, "--json", str(out)], budget, "serve")
    return {"results": json.loads(out.read_text())}


STAGES = {"pytest_gpu": pytest_gpu, "speed": speed, "packing": packing, "trainer": trainer,
          "roofline": roofline, "serve": serve}


# -- report ------------------------------------------------------------------------------------------------------
def _ratio(results: Dict, key: str) -> Optional[float]:
    ratios = results.get("ratios", {}).get("memvp_over_input_prefix", {})
    return ratios.get(key)


def headline(stages: Dict[str, Dict]) -> Dict[str, Optional[float]]:
    """The figures the issue's targets speak of, from whichever stages ran."""
    figures: Dict[str, Optional[float]] = {key: None for key in TARGETS}
    speed_results = stages.get("speed", {}).get("results", {})
    figures["train step, memvp / input_prefix"] = _ratio(speed_results, "train_step_s")
    figures["prefill, memvp / input_prefix"] = _ratio(speed_results, "prefill_s")
    figures["decode, memvp / input_prefix"] = _ratio(speed_results, "decode_ms_per_token")
    zero2 = stages.get("trainer", {}).get("results", {}).get("zero2", {})
    figures["MFU memvp (ZeRO-2 trainer)"] = zero2.get("train/mfu")
    roof = stages.get("roofline", {}).get("results", {})
    figures["decode share of HBM roofline"] = roof.get("memvp", {}).get("share")
    packing_results = stages.get("packing", {}).get("results", {})
    speedups = []
    for backend_results in packing_results.values():
        memvp = backend_results.get("memvp", {})
        if "packed" in memvp and "padded" in memvp:
            speedups.append(memvp["packed"]["tokens_per_s"] / memvp["padded"]["tokens_per_s"])
    figures["packed / padded train tokens/s"] = max(speedups) if speedups else None
    return figures


def _fmt(value: Optional[float], key: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "not measured"
    return f"{100 * value:.1f}%" if "MFU" in key or "share" in key else f"{value:.3g}"


def markdown(report: Dict) -> str:
    lines = [f"# GPU check: {report['device']} ({'CPU smoke run' if report['smoke'] else 'full'})", "",
             f"date {report['date']}, commit {report['commit']}, torch {report['torch']}, total {report['seconds']} s", "",
             "| stage | status | seconds | note |", "| --- | --- | --- | --- |"]
    for name, stage in report["stages"].items():
        lines.append(f"| {name} | {stage['status']} | {stage.get('seconds', '')} | {stage.get('reason', stage.get('summary', ''))[:160]} |")
    lines += ["", "| figure | measured | target (13B shapes) |", "| --- | --- | --- |"]
    for key, target in TARGETS.items():
        lines.append(f"| {key} | {_fmt(report['headline'][key], key)} | {target} |")
    speed_results = report["stages"].get("speed", {}).get("results", {})
    variants = [v for v, r in speed_results.items() if isinstance(r, dict) and "train_step_s" in r]
    if variants:
        lines += ["", "| variant | train step s | prefill s | decode ms/token | peak GB | MFU |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for v in variants:
            r = speed_results[v]
            lines.append(f"| {v} | {r['train_step_s']:.4g} | {r['prefill_s']:.4g} | {r['decode_ms_per_token']:.4g} | "
                         f"{r['peak_memory_gb']:.3g} | {_fmt(r['mfu'], 'MFU')} |")
    trainer_results = report["stages"].get("trainer", {}).get("results", {})
    if trainer_results:
        lines += ["", "| trainer | status | tokens/s | MFU | peak GB |", "| --- | --- | --- | --- | --- |"]
        for zero, r in trainer_results.items():
            lines.append(f"| {zero} | {r['status']} | {_fmt(r.get('train/tokens_per_s'), '')} | "
                         f"{_fmt(r.get('train/mfu'), 'MFU')} | {_fmt(r.get('mem/max_allocated_gb'), '')} |")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT", "benchmarks/results/gpu_check"),
                        help="output folder for gpu_check.json and gpu_check.md (default: $OUT)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: proves the script runs")
    parser.add_argument("--total-s", type=float, default=480, help="the whole check's time budget in seconds")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    args = parser.parse_args(argv)

    import torch

    out = Path(args.out)
    shapes = SMOKE if args.cpu_smoke else GPU
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device: run with --cpu-smoke on a CPU", file=sys.stderr)
        return 2
    check = Check(out, shapes, args.total_s, args.cpu_smoke)
    started = time.monotonic()
    for name in args.stages:
        check.stage(name, lambda budget, fn=STAGES[name]: fn(check, budget))
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "device": _device_name(), "torch": torch.__version__, "commit": _commit(), "smoke": args.cpu_smoke,
              "seconds": round(time.monotonic() - started, 1), "stages": check.stages,
              "headline": headline(check.stages)}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    print(table)
    return 1 if any(s["status"] in ("failed", "timeout") for s in check.stages.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
