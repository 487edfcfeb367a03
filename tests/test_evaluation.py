"""Metrics against hand-computed cases; evaluation does not depend on batch size or rank count."""

import json
import subprocess
import sys

import pytest

from memvp_ds.evaluation.scienceqa import parse_answer, scienceqa_metrics
from memvp_ds.evaluation.vqa import normalize_answer, vqa_accuracy
from tests.helpers import REPO, run_train, train_overrides


def test_parse_answer_pattern_fallback_and_failure():
    assert parse_answer("Answer: The answer is B.", 3) == (1, "pattern")
    assert parse_answer("The answer is (C).", 3) == (2, "pattern")
    assert parse_answer("B. because it is red", 3) == (1, "fallback")
    assert parse_answer("The answer is D.", 3) == (None, "failed")  # only 3 options
    assert parse_answer("no idea", 3) == (None, "failed")


def _problem(answer, subject, hint, image, grade):
    return {"answer": answer, "choices": ["x", "y", "z"], "subject": subject, "hint": hint, "has_image": image,
            "grade": grade}


def test_scienceqa_breakdown_matches_hand_computation():
    records = [
        {"fields": _problem(0, "natural science", "", True, "grade2"), "output": "The answer is A."},   # right
        {"fields": _problem(1, "natural science", "ctx", False, "grade8"), "output": "The answer is A."},  # wrong
        {"fields": _problem(2, "social science", "ctx", True, "grade7"), "output": "C) maybe"},  # right, fallback
        {"fields": _problem(1, "language science", "", False, "grade12"), "output": "hmm"},  # failed
    ]
    m = scienceqa_metrics(records)
    assert m["acc/overall"] == 50.0
    assert (m["acc/NAT"], m["acc/SOC"], m["acc/LAN"]) == (50.0, 100.0, 0.0)
    # TXT: rows 2, 3 (one right); IMG: rows 1, 3 (both right); NO: row 4
    assert (m["acc/TXT"], m["acc/IMG"], m["acc/NO"]) == (50.0, 100.0, 0.0)
    assert (m["acc/G1-6"], m["acc/G7-12"]) == (100.0, pytest.approx(100 / 3))
    assert (m["parse/pattern"], m["parse/fallback"], m["parse/failed"]) == (2, 1, 1)


def test_vqa_accuracy_matches_hand_computation():
    assert normalize_answer("Two dogs!") == "2 dogs"
    assert normalize_answer("the Cat.") == "cat"
    humans = ["2"] * 3 + ["two"] + ["3"] * 6  # after normalisation: four "2", six "3"
    # leave-one-out: dropping a "2" leaves 3 matches -> 1; dropping a "3" leaves 4 -> 1: mean 1.0
    assert vqa_accuracy("two", humans) == 1.0
    humans = ["2", "2"] + ["3"] * 8  # dropping a "2" leaves 1 -> 1/3; dropping a "3" leaves 2 -> 2/3
    assert vqa_accuracy("2", humans) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("4", humans) == 0.0


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_run")
    run_train(train_overrides(dataset, out / "run", "train.max_steps=30", f"data.test_shards={dataset['test']}"))
    return out / "run" / "export" / "trainable.safetensors"


def _evaluate(weights, out, *extra, ranks=1):
    launcher = (["deepspeed", "--num_gpus", str(ranks), "--master_port", "29631"] if ranks > 1 else [sys.executable])
    cmd = [*launcher, "memvp_ds/evaluate.py", "--weights", str(weights), "--split", "test", "--output", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictions = [json.loads(line) for line in open(out / "predictions_test.jsonl")]
    return predictions, json.loads((out / "metrics_test.json").read_text())


@pytest.mark.slow
def test_predictions_do_not_depend_on_batch_size_or_ranks(trained, tmp_path):
    by_one, metrics = _evaluate(trained, tmp_path / "b1", "eval.batch_size=1")
    by_eight, metrics8 = _evaluate(trained, tmp_path / "b8", "eval.batch_size=8")
    two_ranks, metrics2 = _evaluate(trained, tmp_path / "r2", "eval.batch_size=8", ranks=2)
    assert len(by_one) == 32
    key = lambda rows: sorted((r["id"], r["output"]) for r in rows)
    assert key(by_one) == key(by_eight) == key(two_ranks)
    assert metrics == metrics8 == metrics2
    assert {"acc/overall", "acc/IMG", "parse/failed"} <= set(metrics)


def test_predict_uses_the_same_features_as_data_prep_and_answers(dataset, trained):
    """memvp-predict extracts features online with data_prep's recipe: identical to the stored shard."""
    import io

    import numpy as np
    import torch
    import webdataset as wds

    from memvp_ds.engine.checkpoint import read_export_metadata
    from memvp_ds.predict import extract_image_features

    shard = dataset["test"].split("::")[0]
    sample = next(s for s in wds.WebDataset(shard, shardshuffle=False) if "npy" in s)
    fields = json.loads(sample["json"])
    stored = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    image = dataset["root"] / "sqa" / "images" / "test" / fields["source_id"] / "image.png"
    online = extract_image_features(read_export_metadata(str(trained), "feature_recipe"), str(image))
    assert torch.equal(online[0], torch.from_numpy(stored))
    proc = subprocess.run(["memvp-predict", "--weights", str(trained), "--image", str(image), "--question",
                           fields["question"], "--choices", *fields["choices"]], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parsed answer:" in proc.stdout
    missing = subprocess.run(["memvp-predict", "--weights", str(trained), "--image", "/nonexistent.png",
                              "--question", "q?"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "nonexistent.png" in missing.stderr


def test_caption_metrics_match_hand_computation():
    from memvp_ds.evaluation.captioning import caption_metrics

    m = caption_metrics([("A red circle.", ["a red ball"]), ("a blue square", ["a blue square"])])
    # unigrams: 2 of 3 + 3 of 3 match -> 5/6; lengths equal -> no brevity penalty
    assert m["caption/bleu1"] == pytest.approx(100 * 5 / 6, rel=1e-6)
    # bigrams: "a red" (1 of 2) + 2 of 2 -> 3/4; BLEU-2 = sqrt(p1 * p2)
    assert m["caption/bleu2"] == pytest.approx(100 * (5 / 6 * 3 / 4) ** 0.5, rel=1e-6)
    perfect = caption_metrics([("a blue square on top", ["a blue square on top"]),
                               ("a red ball on the left", ["a red ball on the left"])])
    assert perfect["caption/bleu4"] == pytest.approx(100.0, rel=1e-6) and perfect["caption/cider"] > m["caption/cider"]


def test_conversation_predictions_are_scored_against_the_last_answer():
    from memvp_ds.evaluation.run import task_metrics

    turns = [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "a red ball on the left"}]
    records = [{"fields": {"conversations": turns}, "output": "a red ball on the left"},
               {"fields": {"conversations": turns[:1] + [{"from": "gpt", "value": "a blue square on top"}]},
                "output": "a blue square on top"}]
    metrics = task_metrics("conversation", records)
    assert metrics["caption/bleu4"] == pytest.approx(100.0, rel=1e-6) and metrics["count/overall"] == 2
    assert records[0]["gold"] == ["a red ball on the left"]


def test_an_export_answers_the_same_with_another_local_copy_of_its_llm(dataset, trained, tmp_path, capsys):
    """memvp-predict --llm-path: a saved copy of the frozen LLM (and tokenizer) replaces the stored one; the
    answer is the same, and a key=value override lands on top of the stored config."""
    from memvp_ds.cli import llm_path_overrides
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.engine.checkpoint import load_exported
    from memvp_ds.predict import main as predict

    model, cfg = load_exported(str(trained))
    copy = tmp_path / "llm_copy"
    model.llm.save_pretrained(copy)
    load_tokenizer(cfg.data.tokenizer).save_pretrained(copy)
    _, moved = load_exported(str(trained), [*llm_path_overrides(str(copy)), "eval.batch_size=3"])
    assert (moved.model.llm.path, moved.model.llm.config, moved.data.tokenizer) == (str(copy), None, str(copy))
    assert moved.eval.batch_size == 3 and moved.model.memvp == cfg.model.memvp

    image = dataset["root"] / "sqa" / "images" / "test"
    image = next(p for p in sorted(image.glob("*/image.png")))
    question = ["--weights", str(trained), "--image", str(image), "--question", "Which shape is at the top?",
                "--choices", "circle", "square", "triangle"]
    assert predict(question) == 0
    stored_answer = capsys.readouterr().out.splitlines()[-2:]  # the answer and its parsed choice
    assert predict(["--llm-path", str(copy), *question]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == stored_answer and "parsed answer:" in stored_answer[1]
    assert predict(["--llm-path", str(tmp_path / "absent"), *question]) == 2
    assert "absent" in capsys.readouterr().err
