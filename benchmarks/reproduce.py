"""Reproducibility report: the tiny recipe trained twice with one seed and once with another, on one process
and on 2 DeepSpeed CPU ranks, then scored on the test split.

    python benchmarks/reproduce.py                       # about 15 minutes on a 2-core CPU
    python benchmarks/reproduce.py --steps 40 --json benchmarks/results/reproduce.json

The data and the frozen LLM are the quickstart demo's (memvp_demo: synthetic questions, tiny-CLIP features,
a tiny LLaMA-architecture model pre-trained on their text), so the accuracies mean something.

Prints, per layout, the largest difference between the loss curves of the two same-seed runs (0 means bit
for bit), the same against the other seed, the test accuracy of each run and their spread, and the one-process
run against the 2-rank one with the same global batches (1 rank x 2 loader workers x 2 accumulation steps
against 2 ranks x 1 worker: the same samples in the same steps; gradients summed in another order).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _run(cmd: List[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: `{' '.join(cmd[:6])} ...` failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def prepare(work: Path) -> Dict[str, str]:
    """The demo's data and its stand-in LLM pre-trained on text (a random frozen LLM would answer nothing
    parseable in a few steps, and the accuracy spread would mean nothing)."""
    from memvp_demo.demo import prepare_data

    return prepare_data(work, num_train=800, num_test=200)


def train_and_score(data: Dict[str, str], out: Path, seed: int, ranks: int, steps: int, port: int,
                    extra: List[str]) -> Dict:
    # The same global batches either way: 1 rank x 2 loader streams x 2 accumulation steps, 2 ranks x 1.
    layout = ["data.num_workers=2", "train.grad_accum_steps=2"] if ranks == 1 else ["data.num_workers=1"]
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port),
          "-m", "memvp_ds.train", "--config", "tiny_memvp", f"data.train_shards={data['train']}",
          "data.val_shards=null", f"model.llm.path={data['llm']}", "model.llm.config=null",
          f"data.tokenizer={data['tokenizer']}", f"train.output_dir={out}", f"train.seed={seed}",
          f"train.max_steps={steps}", "train.micro_batch_size=8", "logging.log_interval=1", "train.resume=never",
          *layout, *extra])
    _run([sys.executable, "-m", "memvp_ds.evaluate", "--weights", str(out / "export" / "trainable.safetensors"),
          "--split", "test", "--shards", data["test"], "--output", str(out / "eval")])
    return {"losses": _losses(out / "tb"),
            "accuracy": json.loads((out / "eval" / "metrics_test.json").read_text())["acc/overall"]}


def _losses(tb_dir: Path) -> List[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [event.value for event in acc.Scalars("train/loss")]


def largest_difference(a: List[float], b: List[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--json", default="benchmarks/results/reproduce.json")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="memvp-reproduce-"))
    data = prepare(work)
    runs: Dict[str, Dict] = {}
    port = 29700
    for ranks in (1, 2):
        # "nodropout": MemVP's dropout masks are drawn per rank, so only without it do the two layouts
        # compute the same thing (up to the order in which gradients are summed).
        for name, seed, extra in (("a", 0, []), ("b", 0, []), ("other", 1, []),
                                  ("nodropout", 0, ["model.memvp.dropout=0.0"])):
            key = f"{ranks}rank-{name}"
            port += 1
            runs[key] = train_and_score(data, work / key, seed, ranks, args.steps, port, extra)
            print(f"{key}: seed {seed}, final loss {runs[key]['losses'][-1]:.6f}, accuracy {runs[key]['accuracy']:.2f}",
                  flush=True)
    report = {"steps": args.steps, "runs": runs, "layouts": {}}
    for ranks in (1, 2):
        a, b, other = (runs[f"{ranks}rank-{n}"] for n in ("a", "b", "other"))
        accuracies = [a["accuracy"], b["accuracy"], other["accuracy"]]
        report["layouts"][f"{ranks} rank(s)"] = {
            "same_seed_max_loss_difference": largest_difference(a["losses"], b["losses"]),
            "other_seed_max_loss_difference": largest_difference(a["losses"], other["losses"]),
            "same_seed_accuracy_difference": abs(a["accuracy"] - b["accuracy"]),
            "accuracy_spread": max(accuracies) - min(accuracies),
        }
    report["one_vs_two_ranks_same_seed_max_loss_difference"] = largest_difference(
        runs["1rank-a"]["losses"], runs["2rank-a"]["losses"])
    report["one_vs_two_ranks_without_dropout_max_loss_difference"] = largest_difference(
        runs["1rank-nodropout"]["losses"], runs["2rank-nodropout"]["losses"])
    print(f"\n{'layout':<12} {'same seed: max |dloss|':>24} {'other seed: max |dloss|':>25} "
          f"{'same seed: |dacc|':>18} {'acc spread':>11}")
    for layout, row in report["layouts"].items():
        print(f"{layout:<12} {row['same_seed_max_loss_difference']:>24.3g} {row['other_seed_max_loss_difference']:>25.3g} "
              f"{row['same_seed_accuracy_difference']:>18.3g} {row['accuracy_spread']:>11.3g}")
    print(f"1 rank vs 2 ranks, same seed and global batches: max |dloss| "
          f"{report['one_vs_two_ranks_same_seed_max_loss_difference']:.3g}; without dropout "
          f"{report['one_vs_two_ranks_without_dropout_max_loss_difference']:.3g}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
