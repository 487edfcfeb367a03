"""Sequence packing and the labelled-positions LM head: padding fraction and training tokens/s, before/after.

    python benchmarks/packing.py                                   # cpu-small preset, ScienceQA-like lengths
    python benchmarks/packing.py --preset llama13b --layers 4      # 13B layer shapes on a GPU
    python benchmarks/packing.py --lengths synthetic               # lengths of data_prep/synthetic.py prompts
    python benchmarks/packing.py --preset llama13b --attn flash_attention_2   # varlen packed rows on a GPU

Three ways to run the same micro-batches of ``--micro-batch`` samples (forward + backward, random weights):
``padded_full_head`` (before: one row per sample, right padding, LM head on every position), ``padded`` (LM
head on labelled positions only) and ``packed`` (after: samples packed into rows of ``--max-seq-len``, LM
head on labelled positions). Per strategy and mode: rows, positions processed, padding fraction (share of
processed positions that hold no sample: right padding, and input_prefix's masked visual slots of text-only
samples), step time, text tokens/s and the speed-up over ``padded_full_head``. On a CPU the times are the
process's CPU time with one torch thread (``--threads``): on a shared machine wall time measures the
neighbours; on a GPU they are wall time after synchronising. Last, MemVP's packed step time over each other
method's (memvp_over_X).

Lengths: ``scienceqa`` draws prompts from a log-normal (median 120 tokens) clipped to 60-500, with an
8-token answer and an image on half of the samples, matching ScienceQA's QCM-A prompts under the LLaMA
tokenizer and its image share (49% of train); ``synthetic`` tokenises the prompts of the synthetic
ScienceQA-format set that tests and the demo use (short, near-uniform: packing's best case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import PRESETS, Preset, build  # noqa: E402

from memvp_ds.data.collate import TokenizedSample, collate, pack  # noqa: E402
from memvp_ds.data.prompts import IGNORE_INDEX  # noqa: E402

VARIANTS = ("memvp", "input_prefix", "lavin", "apt", "dvp", "llava_lora", "memvp_skip")
"""Every strategy packs exactly; apt and dvp are their official variants (visual tokens in the sequence; the
token slot); llava_lora is input_prefix plus LoRA (speed.py's preset rank)."""
MODES = ("padded_full_head", "padded", "packed")
ANSWER_TOKENS = 8
PAD = 0


def scienceqa_like_lengths(count: int, rng: np.random.Generator, max_seq_len: int) -> List[int]:
    prompts = np.clip(rng.lognormal(np.log(120), 0.5, count), 60, 500).astype(int)
    return [min(int(p) + ANSWER_TOKENS, max_seq_len) for p in prompts]


def synthetic_lengths(count: int, max_seq_len: int) -> List[int]:
    """Token counts of data_prep/synthetic.py problems in QCM-A format, with a tokenizer trained on them."""
    from data_prep.synthetic import make_synthetic_scienceqa
    from memvp_ds.data.prompts import build_segments, encode_segments
    from memvp_ds.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic_scienceqa(f"{tmp}/sqa", num_train=count, num_val=0, num_test=0, seed=0)
        problems = list(json.load(open(f"{tmp}/sqa/problems.json")).values())
        texts = ["".join(t for t, _ in build_segments(p, "qcm_a")) for p in problems]
        tokenizer = train_tokenizer(texts, f"{tmp}/tok", vocab_size=400)
        return [len(encode_segments(tokenizer, build_segments(p, "qcm_a"), max_seq_len).input_ids)
                for p in problems]


def make_samples(lengths: List[int], rng: np.random.Generator, p: Preset) -> List[TokenizedSample]:
    samples = []
    for index, length in enumerate(lengths):
        ids = [int(t) for t in rng.integers(4, p.vocab, length)]
        labels = [IGNORE_INDEX] * (length - ANSWER_TOKENS) + ids[length - ANSWER_TOKENS:]
        image = rng.random() < 0.5
        features = rng.standard_normal((p.visual_tokens, p.visual_dim)).astype(np.float16) if image else None
        samples.append(TokenizedSample(str(index), ids, labels, features, {}))
    return samples


def full_head_loss(model, batch: Dict, dtype, device) -> torch.Tensor:
    """The loss as computed before: LM head on every position, then cross-entropy at the labelled ones."""
    logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                   image_features=batch["image_features"].to(device, dtype), has_image=batch["has_image"].to(device)).logits
    labels = batch["labels"].to(device)[:, 1:].flatten()
    counted = labels >= 0
    return F.cross_entropy(logits[:, :-1].flatten(0, 1)[counted].float(), labels[counted])


def loss_of(model, batch: Dict, mode: str, dtype, device) -> torch.Tensor:
    if mode == "padded_full_head":
        return full_head_loss(model, batch, dtype, device)
    extra = {"segment_ids": batch["segment_ids"].to(device)} if "segment_ids" in batch else {}
    return model(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device),
                 batch["image_features"].to(device, dtype), batch["has_image"].to(device), **extra).loss


def padding_fraction(batches: List[Dict], samples: List[List[TokenizedSample]], visual: int, mode: str) -> float:
    processed = useful = 0
    for batch, group in zip(batches, samples):
        rows, length = batch["input_ids"].shape
        # Strategies with a prefix (input_prefix: N visual positions) add it to every padded row (masked for
        # text-only samples).
        processed += rows * (length + (visual if mode != "packed" else 0))
        useful += sum(len(s.input_ids) + (visual if s.features is not None else 0) for s in group)
    return 1 - useful / processed


def measure(variant: str, p: Preset, device, groups: List[List[TokenizedSample]], max_seq_len: int, skip: int,
            repeats: int, attn: str) -> Dict[str, Dict[str, float]]:
    model = build(variant, p, device, skip).train()
    if attn != "sdpa":
        model.llm.set_attn_implementation(attn)
    dtype = getattr(torch, p.dtype)
    prefix = model.strategy.prefix_positions()  # reserved in a packed row; a padded row gains them in the model
    text_tokens = sum(len(s.input_ids) for g in groups for s in g)
    padded = [collate(g, PAD, (p.visual_tokens, p.visual_dim)) for g in groups]
    packed = [pack(g, PAD, (p.visual_tokens, p.visual_dim), max_seq_len, 8, prefix) for g in groups]
    results = {}
    for mode in MODES:
        batches = packed if mode == "packed" else padded

        def step():
            model.zero_grad(set_to_none=True)
            for batch in batches:
                loss_of(model, batch, mode, dtype, device).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()

        clock = time.perf_counter if device.type == "cuda" else time.process_time
        step()  # warm-up
        times = []
        for _ in range(repeats):
            start = clock()
            step()
            times.append(clock() - start)
        seconds = statistics.median(times)
        results[mode] = {
            "rows": sum(b["input_ids"].shape[0] for b in batches),
            "positions": sum(b["input_ids"].numel() for b in batches) + (
                0 if mode == "packed" else prefix * sum(b["input_ids"].shape[0] for b in batches)),
            "padding_fraction": padding_fraction(batches, groups, prefix, mode),
            "step_s": seconds,
            "tokens_per_s": text_tokens / seconds,
        }
    for mode in MODES:
        results[mode]["speedup"] = results["padded_full_head"]["step_s"] / results[mode]["step_s"]
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--layers", type=int, help="override the preset's number of decoder layers")
    parser.add_argument("--vocab", type=int, help="override the preset's vocabulary (LM head cost)")
    parser.add_argument("--lengths", choices=("scienceqa", "synthetic"), default="scienceqa")
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per timed step")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", type=int, default=1, help="layers memvp_skip skips (layers 1..skip)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--attn", default="sdpa", help="attention backend, e.g. flash_attention_2 (varlen packed rows)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU time is measured)")
    parser.add_argument("--json", default="benchmarks/results/packing.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("layers", args.layers), ("vocab", args.vocab)) if v}
    preset = Preset(**{**asdict(PRESETS[args.preset]), **overrides})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    count = args.micro_batch * args.micro_batches
    lengths = (scienceqa_like_lengths(count, rng, args.max_seq_len) if args.lengths == "scienceqa"
               else synthetic_lengths(count, args.max_seq_len))
    samples = make_samples(lengths, rng, preset)
    groups = [samples[i : i + args.micro_batch] for i in range(0, count, args.micro_batch)]
    results = {name: measure(name, preset, device, groups, args.max_seq_len, args.skip, args.repeats, args.attn)
               for name in args.variants}
    print(f"preset {args.preset} on {device}, {args.attn} ({preset.layers} layers, width {preset.hidden}, vocab {preset.vocab}, "
          f"{preset.visual_tokens} visual tokens); {args.lengths} lengths: {count} samples, mean "
          f"{statistics.mean(lengths):.0f}, min {min(lengths)}, max {max(lengths)}; {args.micro_batches} x "
          f"{args.micro_batch} samples per step, rows of {args.max_seq_len}")
    header = f"{'variant':<14}{'mode':<18}{'rows':>6}{'positions':>11}{'padding':>9}{'step s':>9}{'tokens/s':>10}{'speedup':>9}"
    print(header + "\n" + "-" * len(header))
    for name, modes in results.items():
        for mode, row in modes.items():
            print(f"{name:<14}{mode:<18}{row['rows']:>6}{row['positions']:>11}{row['padding_fraction']:>9.3f}"
                  f"{row['step_s']:>9.3f}{row['tokens_per_s']:>10.0f}{row['speedup']:>9.2f}")
    # MemVP against every other method (its own variants excepted), each in its best mode (packed).
    ratios = {f"memvp_over_{name}": results["memvp"]["packed"]["step_s"] / modes["packed"]["step_s"]
              for name, modes in results.items() if "memvp" in results and not name.startswith("memvp")}
    if ratios:
        print("\npacked step time ratios:")
        for key, ratio in ratios.items():
            print(f"  {key:<28}{ratio:>8.3f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "device": str(device), "attn": args.attn, "config": asdict(preset),
                               "lengths": {"distribution": args.lengths, "values": lengths},
                               "micro_batch": args.micro_batch, "micro_batches": args.micro_batches,
                               "max_seq_len": args.max_seq_len, **results, "ratios": ratios}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
