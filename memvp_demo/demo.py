"""memvp-demo: the whole pipeline on a laptop-class CPU, no downloads, and proof that the model sees images.

Stages (each through the real tools):
  1. data_prep synthetic: coloured shapes with ScienceQA-format questions that need the image;
  2. data_prep extract: a tiny CLIP ViT (a real open_clip architecture, random weights) -> WebDataset shards;
  3. a tokenizer trained on the dataset's text;
  4. training through memvp_ds/train.py (deepspeed, 2 CPU ranks, ZeRO-2) of a tiny LLaMA-architecture model for
     MemVP, the input-space baseline, APT, DVP (its layer found by a KAB-APP search run first), MemVP with
     DAS layer skipping (skip list found by a DAS search run first), and a text-only control (MemVP with
     the image features dropped);
  5. greedy evaluation on the test split, a table, a PNG figure and TensorBoard logs.
Exits non-zero unless MemVP clearly beats the text-only control: it is a smoke test as well as a showcase.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from memvp_ds.cli import command, parser as cli_parser


@dataclass
class Run:
    config: str
    overrides: List[str] = field(default_factory=list)
    search: Optional[str] = None
    """A search run (a key of SEARCHES) that must finish first; the overrides read its result."""


# Searches run for half the training steps; their result is read through ``from_search``. The step sizes
# are large because the rewards of this tiny task differ by fractions of a point.
SEARCHES = {
    "dvp_search": Run("tiny_dvp", ["train.mode=dvp_search", "model.dvp.layer=null", "search.dvp.arms=4",
                                        "search.dvp.interval=5", "search.dvp.eta=5.0"]),
    "das_search": Run("tiny_memvp", ["train.mode=das_search", "search.das.turn=5", "search.das.warmup_steps=50",
                                          "search.das.eta=50.0"]),
}
RUNS = {
    "memvp": Run("tiny_memvp"),
    "input_prefix": Run("tiny_input_prefix"),
    "apt": Run("tiny_apt"),
    "dvp": Run("tiny_dvp", ["model.dvp.layer=null", "model.dvp.from_search={out}/dvp_search"], "dvp_search"),
    "memvp_das": Run("tiny_memvp", ["model.skip.from_search={out}/das_search"], "das_search"),
    "text_only": Run("tiny_memvp", ["data.use_images=false"]),
}
# Accuracy points MemVP must gain over the text-only control: with 200 test questions the standard error
# of each accuracy is about 3.5 points, so 15 points is far beyond chance.
MIN_MARGIN = 15.0
REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "memvp_ds"


def prepare_data(out: Path, num_train: int, num_test: int) -> Dict[str, str]:
    from data_prep.extract import ExtractOptions, run_extract
    from data_prep.sources import ScienceQASource
    from data_prep.synthetic import make_synthetic_scienceqa
    from memvp_ds.data.prompts import build_segments
    from memvp_ds.data.tokenizer import train_tokenizer
    from memvp_ds.vision.clip_features import FeatureRecipe

    sqa, shards, tokenizer = out / "sqa", out / "shards", out / "tokenizer"
    # One shape per image: a tiny frozen model cannot learn in minutes which of two shapes a question means.
    counts = make_synthetic_scienceqa(str(sqa), num_train=num_train, num_val=num_test // 2, num_test=num_test,
                                      max_shapes=1)
    print(f"[1/5] synthetic ScienceQA-format data in {sqa}: {counts}")
    recipe = FeatureRecipe(model="tiny-vit", pretrained="random", image_size=64)
    manifest = run_extract(ScienceQASource(str(sqa)), recipe,
                           ExtractOptions(out_dir=str(shards), samples_per_shard=250, num_workers=2, batch_size=64))
    print(f"[2/5] tiny-CLIP features ({manifest['recipe']['tokens']} x {manifest['recipe']['dim']}) in {shards}")
    with open(sqa / "problems.json") as f:
        problems = json.load(f)
    train_ids = json.load(open(sqa / "pid_splits.json"))["train"]
    train_tokenizer(["".join(t for t, _ in build_segments(p, "qcm_a")) for p in problems.values()], str(tokenizer),
                    vocab_size=400)
    base = out / "base_llm"
    pretrain_base_llm([build_segments(problems[pid], "qcm_a") for pid in train_ids], str(tokenizer), str(base))
    print(f"[3/5] tokenizer and a tiny base LLM trained on the dataset text alone in {tokenizer}, {base}")
    by_split = lambda split: "::".join(str(shards / s["name"]) for s in manifest["shards"] if s["split"] == split)
    return {"train": by_split("train"), "val": by_split("val"), "test": by_split("test"), "tokenizer": str(tokenizer),
            "llm": str(base)}


def pretrain_base_llm(conversations: List[list], tokenizer_dir: str, out_dir: str, steps: int = 400) -> None:
    """The stand-in for LLaMA: the tiny config's LLaMA architecture trained on the training questions and
    answers as text alone (no images), saved as an HF model directory. A randomly initialised frozen LLM could
    not even produce the answer format; this one knows the format and the text-only questions, and text
    alone cannot tell it which letter an image question needs: that is left to the strategy."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from memvp_ds.schema import load_config
    from memvp_ds.data.collate import TokenizedSample, collate
    from memvp_ds.data.prompts import encode_segments
    from memvp_ds.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    inline = dict(load_config("tiny_memvp").model.llm.config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(inline.pop("model_type"), **inline))
    samples = []
    for segments in conversations:
        encoded = encode_segments(tokenizer, segments, 128)
        samples.append(TokenizedSample("", encoded.input_ids, encoded.labels, None, {}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(len(samples), (16,), generator=generator)
        batch = collate([samples[i] for i in rows], tokenizer.pad_token_id, (1, 1))
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def launcher(ranks: int) -> List[str]:
    train_py = str(LIBRARY / "train.py")
    if ranks > 1 and shutil.which("deepspeed"):
        return ["deepspeed", "--num_gpus", str(ranks), train_py]
    return [sys.executable, train_py]


def train_run(name: str, run: Run, data: Dict[str, str], out: Path, ranks: int, steps: int) -> float:
    overrides = [
        f"data.train_shards={data['train']}", f"data.val_shards={data['val']}", f"data.test_shards={data['test']}",
        f"data.tokenizer={data['tokenizer']}", f"train.output_dir={out / name}", f"train.max_steps={steps}",
        f"model.llm.path={data['llm']}", "model.llm.config=null",
        f"train.save_interval={steps}", "train.ds_config=zero2",
        "logging.log_interval=10", *(o.format(out=out) for o in run.overrides),
    ]
    log_path = out / f"{name}.log"
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run([*launcher(ranks), "--config", run.config, *overrides],
                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"training {name} failed (exit {proc.returncode}); see {log_path}")
    return time.time() - start


def evaluate_run(name: str, out: Path, test_shards: str) -> Dict[str, float]:
    import torch

    from memvp_ds.data.shard_format import shard_urls
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.engine.checkpoint import load_exported
    from memvp_ds.evaluation.run import evaluate_split, write_results

    model, cfg = load_exported(str(out / name / "export" / "trainable.safetensors"))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    records, metrics = evaluate_split(cfg, model, tokenizer, shard_urls(test_shards), 0, 1)
    write_results(str(out / name / "eval"), "test", records, metrics)
    return metrics


def scalar_series(run_dir: Path, tag: str) -> Dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def plot(out: Path, results: Dict[str, Dict[str, float]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for name in results:
        series = scalar_series(out / name, "train/loss")
        curves.plot(list(series), list(series.values()), label=name)
    curves.set(title="training loss", xlabel="step", ylabel="loss")
    curves.legend()
    keys = ["overall", "colour", "shape", "position"]
    width = 0.8 / len(results)
    for i, (name, metrics) in enumerate(results.items()):
        bars.bar([k + i * width for k in range(len(keys))], [metrics.get(f"acc/{k}", 0) for k in keys], width, label=name)
    bars.set_xticks([k + width for k in range(len(keys))], keys)
    bars.set(title="test accuracy (%)", ylim=(0, 100))
    bars.legend()
    fig.tight_layout()
    path = out / "demo.png"
    fig.savefig(path, dpi=100)
    return path


def add_question_types(out: Path, name: str, metrics: Dict[str, float]) -> None:
    """Accuracy per synthetic question type (the 'category' field), from the predictions written."""
    totals: Dict[str, List[int]] = {}
    records = [json.loads(line) for line in open(out / name / "eval" / "predictions_test.jsonl")]
    with open(out / "sqa" / "problems.json") as f:
        problems = json.load(f)
    for record in records:
        category = problems[record["id"]]["category"]
        entry = totals.setdefault(category, [0, 0])
        entry[0] += int(record["parsed"] == record["gold"])
        entry[1] += 1
    for category, (right, count) in totals.items():
        metrics[f"acc/{category}"] = 100.0 * right / count


def build_parser() -> argparse.ArgumentParser:
    parser = cli_parser("memvp-demo", __doc__)
    parser.add_argument("--out", default="runs/demo", help="where data, runs, figure and logs go")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks per training run (deepspeed launcher)")
    parser.add_argument("--fast", action="store_true", help="smaller data and fewer steps (the test suite's setting)")
    parser.add_argument("--steps", type=int, help="training steps per run (default: 1500, or 600 with --fast)")
    parser.add_argument("--methods", nargs="+", choices=list(RUNS), default=list(RUNS),
                        help="runs to train and compare (default: all); text_only is the control")
    return parser


@command
def main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "memvp" not in args.methods or "text_only" not in args.methods:
        parser.error("--methods must include memvp and text_only (the demo's pass/fail check compares them)")
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    num_train, num_test, steps = (1200, 200, 600) if args.fast else (2000, 400, 1500)
    steps = args.steps or steps

    data = prepare_data(out, num_train, num_test)
    results, seconds, searched = {}, {}, {}
    for name in args.methods:
        run = RUNS[name]
        if run.search and run.search not in searched:
            print(f"[4/5] searching: {run.search} ({steps // 2} steps) ...", flush=True)
            train_run(run.search, SEARCHES[run.search], data, out, args.ranks, steps // 2)
            searched[run.search] = json.loads((out / run.search / "search.json").read_text())
        print(f"[4/5] training {name} ({steps} steps, {args.ranks} rank(s)) ...", flush=True)
        seconds[name] = train_run(name, run, data, out, args.ranks, steps)
    print("[5/5] evaluating on the test split ...", flush=True)
    for name in args.methods:
        results[name] = evaluate_run(name, out, data["test"])
        add_question_types(out, name, results[name])
        tokens = scalar_series(out / name, "train/tokens_per_s")
        results[name]["tokens_per_s"] = sum(tokens.values()) / max(len(tokens), 1)
        results[name]["train_seconds"] = seconds[name]

    header = f"{'run':<14}{'overall':>9}{'colour':>9}{'shape':>9}{'position':>10}{'train s':>9}{'tokens/s':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, m in results.items():
        print(f"{name:<14}{m.get('acc/overall', 0):>9.1f}{m.get('acc/colour', 0):>9.1f}{m.get('acc/shape', 0):>9.1f}"
              f"{m.get('acc/position', 0):>10.1f}{m['train_seconds']:>9.0f}{m['tokens_per_s']:>10.0f}")
    for name in args.methods:
        if RUNS[name].search:
            found = searched[RUNS[name].search]
            results[name]["search"] = {k: v for k, v in found.items() if k not in ("history", "choice_digest_per_rank")}
            choice = f"layer K = {found['dvp_layer']}" if "dvp_layer" in found else f"skipped layers {found['skip_layers']}"
            print(f"{name}: {choice} (from the {RUNS[name].search} run)")
    figure = plot(out, results)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nfigure: {figure}\nresults: {out / 'results.json'}\nTensorBoard: tensorboard --logdir {out}")

    memvp, control = results["memvp"]["acc/overall"], results["text_only"]["acc/overall"]
    if memvp < control + MIN_MARGIN:
        print(f"FAIL: MemVP ({memvp:.1f}%) does not clearly beat the text-only control ({control:.1f}%)")
        return 1
    print(f"OK: MemVP {memvp:.1f}% vs text-only control {control:.1f}%: the model uses the images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
