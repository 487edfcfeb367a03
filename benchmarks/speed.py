"""Every strategy on the same LLM, batch and text: training step, FLOPs, prefill, decode, memory.

    python benchmarks/speed.py                         # cpu-small preset, a few minutes on a laptop CPU
    python benchmarks/speed.py --preset llama13b       # 13B layer shapes, bf16, on a GPU (--layers to fit)
    python benchmarks/speed.py --json out.json

Variants: memvp, input_prefix (the baseline), lavin (LaVIN: visual tokens in the input plus routed
adapters in every block; the preset's visual tokens, its CLIP not run), apt (official setup: visual tokens in the sequence plus
approximated prompts), apt_rows (the visual features as APT prompt rows instead), dvp (the prompt as a token
at the middle layer, with adapters), dvp_residual (added to the residual stream), llava_lora (the visual tokens
in the sequence plus LoRA on every Linear of the LLM, rank scaled to the preset's width, and LLaVA's
mlp2x_gelu projector), memvp_skip (MemVP with DAS skipping ``--skip`` layers) and memvp_online (MemVP with the frozen CLIP and its trainable adapters run
inside the model on pixels: model.vision.online; a ViT whose output has the preset's visual shape, ViT-L/14
for llama13b). Prints a table and writes JSON with, per variant: train step time, model FLOPs per step
(memvp_online adds the CLIP's), tokens/s, prefill latency, decode ms/token, peak memory, MFU; plus each
variant's ratio to input_prefix, MemVP's ratio to each other method (memvp_over_X; the paper at 7B: 0.72
against LaVIN, 0.57 against LLaVA-LoRA in training step time), and memvp_skip's and memvp_online's ratios to
memvp. Weights are random (speed only). Model FLOPs count the weight matmuls that run (engine/metrics.py:
MatmulFlopCounter), the online CLIP tower's included, plus attention.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memvp_ds.schema import load_config  # noqa: E402
from memvp_ds.engine.metrics import (  # noqa: E402
    MatmulFlopCounter,
    attention_flops_per_position,
    max_memory_gb,
    peak_flops,
)
from memvp_ds.model import build_model  # noqa: E402


@dataclass
class Preset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int
    text_tokens: int
    visual_tokens: int
    memory_rows: int
    visual_dim: int
    dtype: str
    new_tokens: int
    repeats: int
    apt_prompts: int
    dvp_heads: int
    dvp_inner: int
    clip_model: str
    """open_clip model name for memvp_online; empty: a ViT made to the preset's visual shape."""
    clip_layers: int
    """Blocks of that generated ViT (the last one is not run: penultimate-layer features)."""
    clip_image_size: int
    lora_rank: int
    """llava_lora's LoRA rank: LLaVA's 128 at d = 4096-5120, scaled down with the width for small presets."""


PRESETS = {
    "cpu-small": Preset(256, 688, 4, 4, 1000, 2, 64, 64, 80, 128, "float32", 8, 3, 16, 4, 64, "", 5, 128, 8),
    "llama13b": Preset(5120, 13824, 4, 40, 32000, 4, 256, 256, 400, 1024, "bfloat16", 32, 5, 200, 16, 512,
                       "ViT-L-14", 24, 224, 128),
}
VARIANTS = ("memvp", "input_prefix", "lavin", "apt", "apt_rows", "dvp", "dvp_residual", "llava_lora", "memvp_skip",
            "memvp_online")
EXTRA = {"apt_rows": ("apt", ["model.apt.visual=prompt_rows"]),
         # The plain-LLM forms of DVP (its default base is LaVIN, whose own cost is the lavin variant's).
         "dvp": ("dvp", ["model.dvp.base=plain"]),
         "dvp_residual": ("dvp", ["model.dvp.base=plain", "model.dvp.insert=residual"])}
"""Variants that are another option of a strategy: (strategy, overrides)."""


def clip_model(p: Preset) -> str:
    """The preset's CLIP: a named open_clip model, or a model-config JSON for a ViT of the preset's shape."""
    if p.clip_model:
        return p.clip_model
    patch = p.clip_image_size // int(math.isqrt(p.visual_tokens))
    vision = {"image_size": p.clip_image_size, "layers": p.clip_layers, "width": p.visual_dim, "patch_size": patch,
              "head_width": 64}
    text = {"context_length": 16, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1}
    path = Path(tempfile.mkdtemp()) / "bench-vit.json"
    path.write_text(json.dumps({"embed_dim": 64, "vision_cfg": vision, "text_cfg": text}))
    return str(path)


def variant_overrides(variant: str, p: Preset, skip: int) -> List[str]:
    if variant == "memvp_skip":
        return ["model.strategy=memvp", f"model.skip.layers={list(range(1, 1 + skip))}"]
    if variant == "memvp_online":
        return ["model.strategy=memvp", "model.vision.online=true", f"model.vision.recipe.model={clip_model(p)}",
                "model.vision.recipe.pretrained=random", f"model.vision.recipe.image_size={p.clip_image_size}"]
    strategy, overrides = EXTRA.get(variant, (variant, []))
    overrides = [f"model.strategy={strategy}", *overrides]
    if strategy == "apt":
        overrides.append(f"model.apt.prompts={p.apt_prompts}")
    if strategy == "llava_lora":
        overrides += [f"model.lora.rank={p.lora_rank}", f"model.lora.alpha={2 * p.lora_rank}",
                      f"model.projector.hidden_dim={p.hidden}", "model.projector.activation=gelu"]
    if strategy == "dvp":
        overrides += [f"model.dvp.layer={p.layers // 2}", f"model.dvp.heads={p.dvp_heads}",
                      f"model.dvp.inner_dim={p.dvp_inner}"]
    return overrides


def build(variant: str, p: Preset, device: torch.device, skip: int):
    inline = {"model_type": "llama", "hidden_size": p.hidden, "intermediate_size": p.intermediate,
              "num_hidden_layers": p.layers, "num_attention_heads": p.heads, "num_key_value_heads": p.heads,
              "vocab_size": p.vocab, "max_position_embeddings": 4096}
    cfg = load_config(None, [f"model.llm.config={json.dumps(inline)}", f"model.llm.dtype={p.dtype}",
                             *variant_overrides(variant, p, skip), f"model.visual_dim={p.visual_dim}",
                             f"model.visual_tokens={p.visual_tokens}", f"model.memvp.memory_rows={p.memory_rows}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    if model.vision is not None:  # a DeepSpeed engine casts the frozen CLIP to the run's precision too
        model.vision.to(getattr(torch, p.dtype))
    for param in model.trainable_parameters().values():  # bf16 compute like a DeepSpeed bf16 engine
        param.data = param.data.to(getattr(torch, p.dtype))
    return model


def _timed(fn, repeats: int, device: torch.device, clock=time.perf_counter) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    return statistics.median(times)


def _decode_seconds(model, generate, repeats: int, device: torch.device, clock=time.perf_counter) -> float:
    """Median time of the cached decoding steps alone: from the end of the prefill (the strategy's
    ``prefill_finished`` call) to the end of ``generate``. Timing prefill and the whole call separately and
    subtracting would let the prefill's noise (an online CLIP tower runs there) swamp the decode time."""
    strategy, marks = model.strategy, []
    original = strategy.prefill_finished

    def mark_prefill_end():
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(clock())
        original()

    strategy.prefill_finished = mark_prefill_end
    try:
        times = []
        for repeat in range(repeats + 1):  # the first is a warm-up
            generate()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat:
                times.append(clock() - marks[-1])
    finally:
        strategy.prefill_finished = original
    return statistics.median(times)


def measure(variant: str, p: Preset, device: torch.device, peak: float, skip: int,
            clock=time.perf_counter) -> Dict[str, float]:
    model = build(variant, p, device, skip)
    dtype = getattr(torch, p.dtype)
    ids = torch.randint(4, p.vocab, (p.batch, p.text_tokens), device=device)
    if model.vision is None:
        visual = {"image_features": torch.randn(p.batch, p.visual_tokens, p.visual_dim, device=device, dtype=dtype)}
    else:
        size = p.clip_image_size
        visual = {"images": torch.randint(0, 256, (p.batch, 3, size, size), dtype=torch.uint8, device=device)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step():
        model.zero_grad(set_to_none=True)
        model.train()
        model(ids, labels=ids, **visual).loss.backward()

    step = _timed(train_step, p.repeats, device, clock)
    train_memory = max_memory_gb()
    model.eval()
    prefill = _timed(lambda: model.generate(ids, **visual, max_new_tokens=1), p.repeats, device, clock)
    decode = _decode_seconds(model, lambda: model.generate(ids, **visual, max_new_tokens=p.new_tokens,
                                                           stop_when_done=False), p.repeats, device, clock)
    positions = p.text_tokens + model.strategy.prefix_positions()  # visual tokens / DVP's slot in the sequence
    counter = MatmulFlopCounter(model)  # hooked in after the timings, which its hooks would slow
    model.train()
    with torch.no_grad(), counter.counting():
        model(ids, labels=ids, **visual)
    flops = counter.take() + attention_flops_per_position(model, positions) * positions * p.batch
    return {
        "train_step_s": step,
        "train_gflops_per_step": flops / 1e9,
        "train_tokens_per_s": p.batch * p.text_tokens / step,
        "prefill_s": prefill,
        "decode_ms_per_token": 1000 * decode / (p.new_tokens - 1),
        "peak_memory_gb": train_memory,
        "mfu": flops / step / peak if peak else float("nan"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--layers", type=int, help="override the preset's number of decoder layers")
    parser.add_argument("--repeats", type=int, help="timed repetitions (median is reported)")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: GPU table; none on CPU)")
    parser.add_argument("--skip", type=int, default=1, help="layers memvp_skip skips (layers 1..skip)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--cpu-time", action="store_true",
                        help="on a CPU, time this process's CPU time with one torch thread instead of wall time: "
                             "ratios that hold on a machine shared with other work")
    parser.add_argument("--json", default="benchmarks/results/speed.json")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    preset = Preset(**{**asdict(preset), **({"layers": args.layers} if args.layers else {}),
                       **({"repeats": args.repeats} if args.repeats else {})})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.cpu_time and device.type == "cuda":
        parser.error("--cpu-time measures CPU runs; a GPU is timed by wall clock")
    clock = time.perf_counter
    if args.cpu_time:
        # One thread: the CPU time is then the work done, not threads spinning while the cores serve others.
        torch.set_num_threads(1)
        clock = time.process_time
    peak = peak_flops(args.peak_tflops)
    results = {name: measure(name, preset, device, peak, args.skip, clock) for name in args.variants}
    ratios = {f"{name}_over_input_prefix": (name, "input_prefix") for name in results if name != "input_prefix"}
    # MemVP against every other method (its own variants, memvp_skip and memvp_online, excepted).
    ratios.update({f"memvp_over_{name}": ("memvp", name) for name in results if not name.startswith("memvp")})
    ratios["memvp_skip_over_memvp"] = ("memvp_skip", "memvp")
    ratios["memvp_online_over_memvp"] = ("memvp_online", "memvp")
    ratios = {key: {metric: results[a][metric] / results[b][metric] for metric in results[a]}
              for key, (a, b) in ratios.items() if a in results and b in results}
    print(f"preset {args.preset} on {device}{' (CPU time, 1 thread)' if args.cpu_time else ''} "
          f"({preset.layers} layers, batch {preset.batch}, "
          f"{preset.text_tokens} text + {preset.visual_tokens} visual tokens, M = {preset.memory_rows}, "
          f"APT p = {preset.apt_prompts}, memvp_skip skips {args.skip})")
    header = f"{'metric':<22}" + "".join(f"{name:>14}" for name in results)
    print(header + "\n" + "-" * len(header))
    for metric in next(iter(results.values())):
        print(f"{metric:<22}" + "".join(f"{row[metric]:>14.4g}" for row in results.values()))
    print("\nratios (train step time, train GFLOPs, prefill):")
    for key, row in ratios.items():
        print(f"  {key:<28}{row['train_step_s']:>8.3f}{row['train_gflops_per_step']:>8.3f}{row['prefill_s']:>8.3f}")
    results["ratios"] = ratios
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "device": str(device), "clock": "cpu" if args.cpu_time else "wall",
                               "config": asdict(preset), **results},
                              indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
