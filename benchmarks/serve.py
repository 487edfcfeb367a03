"""memvp-serve under a bounded load on loopback: one server per strategy, the same requests, the same code.

    python benchmarks/serve.py                                    # cpu-small shapes, memvp and input_prefix
    python benchmarks/serve.py --strategies memvp input_prefix lavin --concurrency 1 4 16 --requests 4
    python benchmarks/serve.py --preset llama13b --device cuda    # 13B layer shapes (4 layers), bf16, on a GPU

For each strategy an export with random weights is written (the cpu-small shapes of benchmarks/speed.py:
the same LLM with the benchmark tokenizer's vocabulary, 64 visual tokens of width 128 from a ViT run on the
server), memvp-serve starts on 127.0.0.1
as a subprocess, and for each concurrency C, C clients each send --requests streamed chat completions (one
image, a ~60-token multiple-choice question, --max-tokens new tokens) one after another; the load stops by
itself. Reported per strategy and concurrency: requests/s, output tokens/s, latency and time to first token
(TTFT: until the first generated token's chunk) p50/p99, and the server's peak resident host memory (VmHWM;
on a GPU the device memory is not included).
Prints a table and writes JSON. Strategies are names of shipped strategies (``model.strategy``) or of the
variants in benchmarks/speed.py; weights are random (speed only).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from speed import PRESETS, clip_model, variant_overrides  # noqa: E402

from memvp_ds.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from memvp_ds.export import write_export  # noqa: E402
from memvp_ds.model import build_model  # noqa: E402
from memvp_ds.schema import load_config  # noqa: E402

QUESTION = ("Which of these states is farthest north, judging by the map in the picture and the labels on it? "
            "Context: The map shows the states of the country with their names. (A) West Virginia (B) Louisiana "
            "(C) Arizona (D) Oklahoma")


def write_bench_export(strategy: str, preset: str, folder: Path) -> str:
    """An export of ``strategy`` at the preset's shapes with random trainable weights and a trained tokenizer."""
    p = PRESETS[preset]
    tokenizer = folder / "tokenizer"
    if not tokenizer.exists():
        texts = [QUESTION.replace("north", word) for word in ("north", "south", "east", "west")] * 20
        train_tokenizer(texts, str(tokenizer), vocab_size=min(p.vocab, 400))
    # The LLM's vocabulary is the tokenizer's: a random model's tokens beyond it would stream no text, and
    # the time to first token is read from the first chunk that carries text.
    inline = {"model_type": "llama", "hidden_size": p.hidden, "intermediate_size": p.intermediate,
              "num_hidden_layers": p.layers, "num_attention_heads": p.heads, "num_key_value_heads": p.heads,
              "vocab_size": len(load_tokenizer(str(tokenizer))), "max_position_embeddings": 4096}
    cfg = load_config(None, [f"model.llm.config={json.dumps(inline)}", f"model.llm.dtype={p.dtype}",
                             *variant_overrides(strategy, p, 1), f"model.visual_dim={p.visual_dim}",
                             f"model.visual_tokens={p.visual_tokens}", f"model.memvp.memory_rows={p.memory_rows}",
                             f"data.tokenizer={tokenizer}", "data.prompt_format=qcm_a"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    recipe = {"model": clip_model(p), "pretrained": "random", "image_size": p.clip_image_size, "dtype": p.dtype}
    path = folder / f"{strategy}.safetensors"
    write_export({k: v.contiguous() for k, v in model.trainable_state_dict().items()}, str(path), cfg, recipe)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_url() -> str:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def one_request(base: str, model: str, image: str, max_tokens: int) -> Dict[str, float]:
    """A streamed completion: latency, TTFT (the first chunk that carries a token) and output tokens."""
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                      {"type": "image_url", "image_url": {"url": image}}]}]}
    request = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start, first, tokens = time.perf_counter(), None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            choice = chunk["choices"][0] if chunk["choices"] else {}
            if first is None and (choice.get("delta", {}).get("content") or choice.get("finish_reason")):
                first = time.perf_counter()
    end = time.perf_counter()
    return {"latency_s": end - start, "ttft_s": (first or end) - start, "tokens": tokens}


def _percentile(values: List[float], q: float) -> float:
    return float(np.percentile(values, q))


def load(base: str, model: str, concurrency: int, requests: int, max_tokens: int) -> Dict[str, float]:
    image = _image_url()
    one_request(base, model, image, max_tokens)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = [pool.submit(lambda: [one_request(base, model, image, max_tokens) for _ in range(requests)])
                for _ in range(concurrency)]
        results = [r for run in runs for r in run.result()]
    elapsed = time.perf_counter() - start
    latency, ttft = [r["latency_s"] for r in results], [r["ttft_s"] for r in results]
    return {"requests": len(results), "requests_per_s": len(results) / elapsed,
            "output_tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
            "latency_p50_s": _percentile(latency, 50), "latency_p99_s": _percentile(latency, 99),
            "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99)}


def peak_memory_gb(pid: int) -> float:
    """The server process's peak resident memory (Linux VmHWM) over the whole run."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def bench_strategy(strategy: str, args, folder: Path) -> Dict[str, Dict[str, float]]:
    export = write_bench_export(strategy, args.preset, folder)
    port = _free_port()
    command = [sys.executable, "-m", "memvp_ds.serve.cli", "--weights", export, "--port", str(port),
               "--max-rows", str(max(args.concurrency)), "--max-queue", str(4 * max(args.concurrency)),
               "--model-name", strategy, "--device", args.device]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"memvp-serve ({strategy}) did not start: {server.stderr.read()[-2000:]}")
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except OSError:
                time.sleep(0.3)
        rows = {str(c): load(base, strategy, c, args.requests, args.max_tokens) for c in args.concurrency}
        return {"concurrency": rows, "peak_memory_gb": peak_memory_gb(server.pid)}
    finally:
        server.terminate()
        server.wait(60)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--strategies", nargs="+", default=["memvp", "input_prefix"],
                        help="strategies (or benchmarks/speed.py variants), one server each")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16], help="concurrent clients")
    parser.add_argument("--requests", type=int, default=4, help="requests each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per request")
    parser.add_argument("--device", default="cpu", help="where the servers run the model (cpu or cuda)")
    parser.add_argument("--json", default="benchmarks/results/serve.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results: Dict[str, Dict] = {"preset": args.preset, "max_tokens": args.max_tokens, "requests": args.requests}
    with tempfile.TemporaryDirectory() as folder:
        for strategy in args.strategies:
            results[strategy] = bench_strategy(strategy, args, Path(folder))
    header = (f"{'strategy':<14}{'C':>4}{'req/s':>9}{'tok/s':>9}{'lat p50':>9}{'lat p99':>9}{'ttft p50':>10}"
              f"{'ttft p99':>10}{'peak GB':>9}")
    print(header)
    for strategy in args.strategies:
        for concurrency, row in results[strategy]["concurrency"].items():
            print(f"{strategy:<14}{concurrency:>4}{row['requests_per_s']:>9.2f}{row['output_tokens_per_s']:>9.1f}"
                  f"{row['latency_p50_s']:>9.3f}{row['latency_p99_s']:>9.3f}{row['ttft_p50_s']:>10.3f}"
                  f"{row['ttft_p99_s']:>10.3f}{results[strategy]['peak_memory_gb']:>9.2f}")
    low, high = str(min(args.concurrency)), str(max(args.concurrency))
    at = lambda strategy, concurrency, key: results[strategy]["concurrency"][concurrency][key]
    ratios = {s: {f"throughput_c{high}_over_c{low}": at(s, high, "requests_per_s") / at(s, low, "requests_per_s")}
              for s in args.strategies}
    if "memvp" in args.strategies:
        for other in args.strategies:
            if other != "memvp":
                ratios["memvp"][f"ttft_p50_c{low}_over_{other}"] = (at("memvp", low, "ttft_p50_s")
                                                                     / at(other, low, "ttft_p50_s"))
    results["ratios"] = ratios
    print(json.dumps(ratios, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
