"""Metrics against hand-computed cases; evaluation does not depend on batch size or rank count."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from memvp_ds.export import read_export_metadata, read_provenance
from memvp_ds.provenance import config_sha256
from memvp_ds.schema import load_config
from memvp_ds.scoring.scienceqa import parse_answer, scienceqa_metrics
from memvp_ds.scoring.vqa import normalize_answer, vqa_accuracy
from tests.helpers import REPO, free_port, run_train, train_overrides


# (decoded output, number of choices, the official reading: first capital letter, if it is one of the choices)
OFFICIAL_READINGS = [
    (" A", 3, 0), ("A", 3, 0), ("B", 2, 1), ("A:", 3, 0), ("(B)", 3, 1), ("B.", 3, 1), ("\nC", 3, 2),
    ("E", 5, 4),
    ("The answer is: (B)", 3, None),  # reads 'T' from 'The': not an option
    ("Answer: B", 5, 0),              # the 'A' of 'Answer': the official reading, faithfully
    ("", 3, None), (" ", 3, None), (".", 3, None),
    ("a", 3, None), (" b", 3, None),  # lowercase is no answer
    ("D", 3, None), ("E", 4, None),   # beyond the choices
    ("1", 3, None),
]


@pytest.mark.parametrize("output, choices, expected", OFFICIAL_READINGS)
def test_parse_answer_is_the_official_reading(output, choices, expected):
    assert parse_answer(output, choices) == expected
    # independently: eval.py's re.findall(r'([A-Z])') first match, kept only within options[:len(choices)]
    import re

    found = re.findall(r"([A-Z])", output)
    official = "ABCDE"[:choices].index(found[0]) if found and found[0] in "ABCDE"[:choices] else None
    assert official == expected


def _problem(answer, subject, hint, image, grade):
    return {"answer": answer, "choices": ["x", "y", "z"], "subject": subject, "hint": hint, "has_image": image,
            "grade": grade}


def test_scienceqa_breakdown_matches_hand_computation():
    records = [
        {"fields": _problem(0, "natural science", "", True, "grade2"), "output": " A"},   # right
        {"fields": _problem(1, "natural science", "ctx", False, "grade8"), "output": "A"},  # wrong
        {"fields": _problem(2, "social science", "ctx", True, "grade7"), "output": "C"},  # right
        {"fields": _problem(1, "language science", "", False, "grade12"), "output": " b"},  # parse failure
    ]
    m = scienceqa_metrics(records)
    assert m["acc/overall"] == 50.0
    assert (m["acc/NAT"], m["acc/SOC"], m["acc/LAN"]) == (50.0, 100.0, 0.0)
    # TXT: rows 2, 3 (one right); IMG: rows 1, 3 (both right); NO: row 4
    assert (m["acc/TXT"], m["acc/IMG"], m["acc/NO"]) == (50.0, 100.0, 0.0)
    assert (m["acc/G1-6"], m["acc/G7-12"]) == (100.0, pytest.approx(100 / 3))
    assert m["count/parse_failures"] == 1 and m["count/overall"] == 4
    assert [r["parsed"] for r in records] == [0, 0, 2, None] and [r["gold"] for r in records] == [0, 1, 2, 1]


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


def _evaluate(weights, out, *extra, ranks=1, shards):
    launcher = (["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port())] if ranks > 1 else [sys.executable])
    cmd = [*launcher, "memvp_ds/evaluate.py", "--weights", str(weights), "--split", "test", "--shards", shards,
           "--output", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictions = [json.loads(line) for line in open(out / "predictions_test.jsonl")]
    return predictions, json.loads((out / "metrics_test.json").read_text())


@pytest.mark.slow
def test_predictions_do_not_depend_on_batch_size_or_ranks(dataset, trained, tmp_path):
    test = dataset["test"]  # an export's stored shards are never used (tests/test_reliability.py)
    # One rank answering one question per batch against two ranks answering 8 per batch (left padding,
    # the rank split and the padded last batch all differ).
    by_one, metrics = _evaluate(trained, tmp_path / "b1", "eval.batch_size=1", shards=test)
    two_ranks, metrics2 = _evaluate(trained, tmp_path / "r2", "eval.batch_size=8", ranks=2, shards=test)
    assert len(by_one) == 32
    key = lambda rows: sorted((r["id"], r["output"]) for r in rows)
    assert key(by_one) == key(two_ranks)
    assert metrics == metrics2
    assert {"acc/overall", "acc/IMG", "count/parse_failures"} <= set(metrics)
    assert metrics["answer_tokens"] == 1 and metrics["use_caption"] is True
    # memvp-eval writes what it scored, on what, by which code next to the metrics.
    provenance = json.loads((tmp_path / "b1" / "provenance_test.json").read_text())
    assert provenance["weights_sha256"] == hashlib.sha256(trained.read_bytes()).hexdigest()
    assert provenance["trained"] == read_provenance(str(trained)) and provenance["trained"]["seed"] == 0


def test_export_and_checkpoint_record_where_they_came_from_and_memvp_info_prints_it(dataset, trained):
    recorded = read_provenance(str(trained))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert recorded["git_commit"] == head and isinstance(recorded["git_dirty"], bool)
    assert recorded["versions"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    manifest = dataset["root"] / "shards" / "manifest.json"
    assert recorded["data_manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    state = json.loads(next((trained.parent.parent / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["provenance"] == recorded  # checkpoints carry the same record
    # The config hash names what is learned, not where things are: a moved run keeps it, another lr does not.
    cfg = load_config(None, overrides=[], stored=read_export_metadata(str(trained)))
    assert recorded["config_sha256"] == config_sha256(cfg)
    moved = load_config(None, overrides=["train.output_dir=/elsewhere", "data.tokenizer=/other/tok"],
                        stored=read_export_metadata(str(trained)))
    relearned = load_config(None, overrides=["train.blr=0.5"], stored=read_export_metadata(str(trained)))
    assert config_sha256(moved) == recorded["config_sha256"] != config_sha256(relearned)
    text = subprocess.run(["memvp-info", str(trained)], capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert f"code: {head}" in text.stdout and f"config sha256: {recorded['config_sha256']}" in text.stdout
    as_json = subprocess.run(["memvp-info", str(trained), "--json"], capture_output=True, text=True, timeout=120)
    info = json.loads(as_json.stdout)
    assert info["provenance"] == recorded and info["strategy"] == "memvp" and info["trainable_parameters"] > 0
    missing = subprocess.run(["memvp-info", "/nonexistent.safetensors"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: /nonexistent.safetensors")


def test_predict_uses_the_same_features_as_data_prep_and_answers(dataset, trained):
    """memvp-predict extracts features online with data_prep's recipe: identical to the stored shard."""
    import io

    import numpy as np
    import torch
    import webdataset as wds

    from memvp_ds.export import read_export_metadata
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
    from memvp_ds.scoring.captioning import caption_metrics

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


def test_scienceqa_evaluation_reads_one_token_after_the_answer_prefix(dataset):
    """The official protocol on the tiny model: prompt + 'The answer is', ONE greedy token, its first capital
    letter. Each output is checked against an independent greedy step of the model on the unpadded prompt."""
    import re

    import torch

    from memvp_ds.data.shard_format import read_shard
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.evaluation.run import evaluate_split
    from tests.conftest import tiny_config, tiny_model

    cfg = tiny_config("memvp", "eval.batch_size=5", "eval.max_samples=12", "eval.max_new_tokens=7")
    model, tok = tiny_model("memvp").eval(), load_tokenizer(dataset["tokenizer"])
    urls = dataset["test"].split("::")
    records, metrics = evaluate_split(cfg, model, tok, urls, 0, 1)
    samples = {key: (fields, features) for url in urls for key, fields, features in read_shard(url)}
    assert len(records) == 12 and metrics["answer_tokens"] == 1 and metrics["count/overall"] == 12
    assert metrics["use_caption"] is True and metrics["count/captioned"] == 0  # the synthetic set has no captions
    failures = 0
    for record in records:
        fields, features = samples[record["id"]]
        assert record["prompt"].endswith("\nResponse:The answer is")
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(record["prompt"], add_special_tokens=False)])
        feats = None if features is None else torch.from_numpy(features).float()[None]
        with torch.no_grad():
            token = model(ids, image_features=feats, has_image=torch.tensor([feats is not None])).logits[0, -1].argmax()
        expected = "" if token == tok.eos_token_id else tok.decode([int(token)], skip_special_tokens=True)
        assert record["output"] == expected
        found = re.findall(r"([A-Z])", expected)
        letters = "ABCDE"[: len(fields["choices"])]
        official = letters.index(found[0]) if found and found[0] in letters else None
        assert record["parsed"] == official
        failures += official is None
    assert metrics["count/parse_failures"] == failures


def test_evaluation_context_carries_the_caption(dataset):
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.evaluation.run import eval_encoder
    from tests.conftest import tiny_config

    tok = load_tokenizer(dataset["tokenizer"])
    fields = {"question": "Which?", "hint": "A hint.", "choices": ["x", "y"], "answer": 0, "caption": "A cat."}
    raw = {"__key__": "k", "json": json.dumps(fields).encode()}
    decode = lambda cfg: tok.decode(eval_encoder(cfg, tok)(raw).input_ids, skip_special_tokens=True)
    assert decode(tiny_config("memvp")).split("\n")[1] == "Context: A hint. A cat."
    assert decode(tiny_config("memvp", "eval.use_caption=false")).split("\n")[1] == "Context: A hint."


def test_a_tokenizer_without_bos_trains_and_evaluates(dataset, tmp_path):
    """Qwen2-style: no BOS token. The real entry point trains with it; the export evaluates."""
    from memvp_ds.data.prompts import build_segments
    from memvp_ds.data.tokenizer import load_tokenizer, train_tokenizer
    from memvp_ds.export import load_exported
    from memvp_ds.evaluation.run import evaluate_split

    problems = json.load(open(dataset["root"] / "sqa" / "problems.json"))
    texts = ["".join(t for t, _ in build_segments(p, "qcm_a")) for p in problems.values()]
    train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=400, with_bos=False)
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.bos_token_id is None
    overrides = train_overrides(dataset, tmp_path / "run", "train.max_steps=4", f"data.tokenizer={tmp_path / 'tok'}")
    run_train(overrides)
    model, cfg = load_exported(str(tmp_path / "run" / "export" / "trainable.safetensors"))
    records, metrics = evaluate_split(cfg, model, tok, dataset["test"].split("::"), 0, 1)
    assert metrics["count/overall"] == 32 and len(records) == 32
    assert all(r["prompt"].startswith("Question: ") for r in records)


def test_an_export_answers_the_same_with_another_local_copy_of_its_llm(dataset, trained, tmp_path, capsys):
    """memvp-predict --llm-path: a saved copy of the frozen LLM (and tokenizer) replaces the stored one; the
    answer is the same, and a key=value override lands on top of the stored config."""
    from memvp_ds.cli import llm_path_overrides
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.export import load_exported
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
