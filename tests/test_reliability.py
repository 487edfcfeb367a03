"""Failure paths of a real cluster run: crafted exports, broken data, signals to the process group, broken
and incompatible checkpoints, pre-flight checks. docs/reliability.md states each guarantee and names its test."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from data_prep.shards import write_shard
from memvp_ds import ConfigError, load_config
from memvp_ds.data.collate import SampleEncoder
from memvp_ds.data.plan import plan_data
from memvp_ds.data.shard_format import read_shard
from memvp_ds.data.stream import DataStreamError, ErrorBudget, TrainStream, _Collate, iterate_eval_batches
from memvp_ds.data.tokenizer import load_tokenizer
from memvp_ds.export import export_metadata, read_export_metadata
from memvp_ds.engine import checkpoint as ckpt
from memvp_ds.model.llm import check_vocab_fits
from memvp_ds.run_folder import check_writable
from tests.conftest import tiny_config, tiny_model
from tests.helpers import REPO, run_train, train_overrides


# -- 1. stored configs are data -------------------------------------------------------------------------

def _crafted_export(path: Path, dataset: dict, marker: Path, elsewhere: Path) -> None:
    """An export whose stored config would run a command (a 'pipe:' URL that creates ``marker``), write to
    ``elsewhere`` and trust remote code, with the metadata layout export_trainable writes."""
    cfg = tiny_config("memvp", f"data.tokenizer={dataset['tokenizer']}", f"train.output_dir={elsewhere}",
                      "model.llm.trust_remote_code=true")
    first = dataset["test"].split("::")[0]
    evil = f"pipe:touch {marker}; cat {first}"
    cfg.data.test_shards = cfg.data.val_shards = cfg.data.train_shards = evil
    cfg.data.manifest = str(elsewhere / "manifest.json")
    model = tiny_model("memvp")
    tensors = {name: p.detach().clone().contiguous() for name, p in model.trainable_parameters().items()}
    save_file(tensors, str(path), metadata=export_metadata(cfg, dataset["manifest"]["recipe"]))


def test_stored_config_names_no_command_output_or_remote_code(dataset, tmp_path):
    marker, elsewhere = tmp_path / "pwned", tmp_path / "elsewhere"
    export = tmp_path / "crafted.safetensors"
    _crafted_export(export, dataset, marker, elsewhere)
    stored = read_export_metadata(str(export))
    assert stored["data"]["test_shards"].startswith("pipe:") and stored["model"]["llm"]["trust_remote_code"]
    cfg = load_config(stored=stored)
    assert (cfg.data.train_shards, cfg.data.val_shards, cfg.data.test_shards, cfg.data.manifest) == (None,) * 4
    assert cfg.train.output_dir != str(elsewhere) and cfg.model.llm.trust_remote_code is False
    assert cfg.model.memvp.memory_rows == 24, "model options still come from the export"
    own = load_config(stored=stored, overrides=["model.llm.trust_remote_code=true", "data.test_shards=mine"])
    assert own.model.llm.trust_remote_code is True and own.data.test_shards == "mine", "the user's own choice"


def test_evaluate_and_predict_with_crafted_export_run_nothing_and_write_nowhere_else(dataset, tmp_path):
    marker, elsewhere, out = tmp_path / "pwned", tmp_path / "elsewhere", tmp_path / "out"
    export = tmp_path / "crafted.safetensors"
    _crafted_export(export, dataset, marker, elsewhere)
    evaluate = [sys.executable, "-m", "memvp_ds.evaluate", "--weights", str(export), "--split", "test"]
    run = lambda *args: subprocess.run([*evaluate, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    no_shards = run("--output", str(out))
    assert no_shards.returncode != 0 and "--shards" in no_shards.stderr
    no_output = run("--shards", dataset["test"])
    assert no_output.returncode != 0 and "--output is required" in no_output.stderr
    proc = run("--shards", dataset["test"], "--output", str(out), "eval.max_samples=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trust_remote_code=False" in proc.stdout and dataset["test"].split("::")[0] in proc.stdout
    assert json.loads((out / "metrics_test.json").read_text())["count/overall"] == 4
    assert (out / "tb").is_dir()
    predict = subprocess.run([sys.executable, "-m", "memvp_ds.predict", "--weights", str(export), "--question",
                              "What colour?", "--choices", "red", "blue"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert predict.returncode == 0 and "parsed answer:" in predict.stdout, predict.stderr[-3000:]
    assert "trust_remote_code=False" in predict.stderr
    assert not marker.exists(), "a command from the stored config ran"
    assert not elsewhere.exists(), "something was written where the stored config pointed"


def test_predict_checks_the_image_before_loading_any_model(dataset, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    proc = subprocess.run([sys.executable, "-m", "memvp_ds.predict", "--weights", str(tmp_path / "absent.safetensors"),
                           "--image", str(broken), "--question", "q?"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    # The weights do not exist either: the image error comes first, so no model was loaded.
    assert proc.returncode == 2 and "broken.png: cannot read the image" in proc.stderr, proc.stderr


# -- 2. the data stream's error budget ------------------------------------------------------------------

def _samples(dataset, n: int):
    shard = dataset["train"].split("::")[0]
    return list(read_shard(shard))[:n]


def _stream(dataset, urls, prompt_format="qcm_a", budget=ErrorBudget(), counts=None, micro_batch=4):
    tokenizer = load_tokenizer(dataset["tokenizer"])
    encoder = SampleEncoder(tokenizer, prompt_format, 128, 16, 32)
    collate_fn = _Collate(tokenizer.pad_token_id, encoder.feature_shape, 8, left_pad=False)
    return TrainStream(urls, encoder, micro_batch, collate_fn, seed=0, rank=0, world_size=1, num_workers=0,
                       shuffle_buffer=8, expected_counts=counts, budget=budget)


def _qa_shard(dataset, path: Path, n: int = 24) -> str:
    """Question/answer samples (no choices): every one fails under the multiple-choice format."""
    write_shard(str(path), [(f"qa{i:03d}", {"question": f"q{i}?", "answer": "red", "has_image": False}, None)
                            for i in range(n)])
    return str(path)


def test_systematic_failures_stop_with_one_error_and_few_log_lines(dataset, tmp_path, caplog):
    url = _qa_shard(dataset, tmp_path / "qa-000000.tar")
    caplog.set_level(logging.WARNING, logger="memvp_ds.data")
    with pytest.raises(DataStreamError) as err:
        next(iter(_stream(dataset, [url], budget=ErrorBudget(max_in_row=200))))  # the shard is read pass after pass
    message = str(err.value)
    assert "200 samples in a row" in message and url in message and "sample qa" in message and "KeyError" in message
    assert "data.prompt_format" in message
    assert len(caplog.records) <= 5 + 8, "warnings are summarised, not one per sample"


def test_fraction_rule_stops_alternating_failures(dataset, tmp_path):
    good = _samples(dataset, 24)
    mixed = [s if i % 3 == 0 else (f"qa{i:03d}", {"question": "q", "answer": "x"}, None) for i, s in enumerate(good)]
    url = str(tmp_path / "mixed-000000.tar")
    write_shard(url, mixed)
    with pytest.raises(DataStreamError, match=r"of \d+ samples read were unusable"):
        for _ in _stream(dataset, [url], budget=ErrorBudget(max_in_row=30, max_fraction=0.5)):
            pass


def test_non_finite_features_are_skipped_and_counted(dataset, tmp_path):
    samples = _samples(dataset, 24)
    index = next(i for i, s in enumerate(samples) if s[2] is not None)
    key, fields, features = samples[index]
    poisoned = features.copy()
    poisoned[0, 0] = np.nan
    samples[index] = (key, fields, poisoned)
    url = str(tmp_path / "nan-000000.tar")
    write_shard(url, samples)
    batches = iter(_stream(dataset, [url], micro_batch=23))
    first = next(batches)
    assert first["skipped_samples"] == 1 and key not in first["keys"]
    assert torch.isfinite(first["image_features"]).all()


def test_features_of_another_shape_stop_at_once(dataset, tmp_path):
    samples = _samples(dataset, 24)
    index = next(i for i, s in enumerate(samples) if s[2] is not None)
    key, fields, _ = samples[index]
    samples[index] = (key, fields, np.zeros((16, 48), dtype=np.float16))
    url = str(tmp_path / "wide-000000.tar")
    write_shard(url, samples)
    with pytest.raises(DataStreamError, match=rf"{url}, sample {key}: FeatureShapeError.*\(16, 48\)"):
        for _ in _stream(dataset, [url]):
            pass


def test_eval_split_without_usable_samples_is_an_error(dataset, tmp_path):
    url = _qa_shard(dataset, tmp_path / "qa-000000.tar", n=8)
    tokenizer = load_tokenizer(dataset["tokenizer"])
    encoder = SampleEncoder(tokenizer, "qcm_a", 128, 16, 32, with_target=False)
    with pytest.raises(DataStreamError, match="none of the 8 samples"):
        list(iterate_eval_batches([url], encoder, 4, tokenizer.pad_token_id, 0, 1))


def test_evaluation_keeps_the_configured_error_budget(dataset, tmp_path):
    """memvp-eval's split reader takes data.max_bad_in_row from the run config, as training does."""
    from memvp_ds.evaluation.run import evaluate_split
    from tests.conftest import tiny_config, tiny_model

    good = _samples(dataset, 6)
    bad = [(f"qa{i:03d}", {"question": "q", "answer": "x"}, None) for i in range(3)]
    url = str(tmp_path / "holes-000000.tar")
    write_shard(url, good[:3] + bad + good[3:])
    model, tokenizer = tiny_model("memvp").eval(), load_tokenizer(dataset["tokenizer"])
    records, metrics = evaluate_split(tiny_config("memvp"), model, tokenizer, [url], 0, 1)
    assert sorted(r["id"] for r in records) == sorted(s[0] for s in good) and metrics["count/overall"] == 6
    with pytest.raises(DataStreamError, match="3 samples in a row"):
        evaluate_split(tiny_config("memvp", "data.max_bad_in_row=3"), model, tokenizer, [url], 0, 1)


def test_shards_missing_from_the_manifest_stop_before_training(dataset, tmp_path):
    stray = tmp_path / "stray-000000.tar"
    shutil.copy(dataset["train"].split("::")[0], stray)
    manifest = Path(dataset["train"].split("::")[0]).parent / "manifest.json"
    cfg = tiny_config("memvp", f"data.train_shards={dataset['train']}::{stray}", f"data.manifest={manifest}")
    with pytest.raises(ConfigError, match="stray-000000.tar is not a train shard of .*manifest.json"):
        plan_data(cfg, 1)


def test_wrong_prompt_format_stops_a_real_training_run_quickly(dataset, tmp_path):
    """Question/answer shards trained with the multiple-choice format: one error, a short log, exit != 0."""
    urls = [_qa_shard(dataset, tmp_path / f"qa-{i:06d}.tar") for i in range(2)]
    manifest = dict(dataset["manifest"], shards=[{"name": Path(u).name, "samples": 24, "split": "train",
                                                  "with_image": 0, "bytes": Path(u).stat().st_size} for u in urls])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    proc = run_train(train_overrides({**dataset, "train": "::".join(urls)}, tmp_path / "run", "train.max_steps=5",
                                     "train.resume=never", "data.val_shards=null"), check=False, timeout=240)
    assert proc.returncode != 0
    assert "DataStreamError" in proc.stderr and "50 samples in a row" in proc.stderr and "KeyError" in proc.stderr
    assert len(proc.stderr) < 100_000, "the log must not flood"


# -- 3 + 4. signals to the process group, checkpoints ---------------------------------------------------

def test_sigterm_to_the_process_group_saves_and_the_rerun_resumes(dataset, tmp_path):
    out, log_path = tmp_path / "run", tmp_path / "train.log"
    overrides = train_overrides(dataset, out, "train.max_steps=2000", "train.save_interval=1000")
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "memvp_ds/train.py", "--config", "configs/tiny_memvp.yaml",
                                 *overrides], cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 240
        while "step 1:" not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # as Slurm does: the main process and its loader worker
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "preempted" and 1 <= status["step"] < 2000
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert latest.name == f"step-{status['step']:08d}" and ckpt.checkpoint_problem(str(latest)) is None
    rerun = run_train([*overrides[:-1], f"train.max_steps={status['step'] + 2}", "logging.log_interval=1"])
    assert f"resumed from {latest} at step {status['step']}" in rerun.stderr
    assert json.loads((out / "status.json").read_text()) == {
        "status": "complete", "step": status["step"] + 2, "total_steps": status["step"] + 2}


@pytest.fixture(scope="module")
def trained_run(dataset, tmp_path_factory):
    """One short run with checkpoints at steps 2, 4, 6 (reused by the checkpoint tests, copied before use)."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    run_train(train_overrides(dataset, out, "train.max_steps=6", "train.save_interval=2", "train.keep_last=3"))
    return out


def test_fresh_run_among_an_older_runs_higher_checkpoints_keeps_its_own(dataset, trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", out / "checkpoints")
    for name in ("step-00000002", "step-00000004", "step-00000006"):  # an older, longer run's checkpoints
        os.rename(out / "checkpoints" / name, out / "checkpoints" / name.replace("0000000", "0000010"))
    run_train(train_overrides(dataset, out, "train.max_steps=3", "train.save_interval=1", "train.keep_last=2",
                              "train.resume=never"))
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000003"
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    assert names == ["step-00000002", "step-00000003", "step-00000102", "step-00000104", "step-00000106"], names
    assert ckpt.find_resume_checkpoint(str(out), "auto") == str(root / "step-00000003")


def test_broken_newest_checkpoint_falls_back_to_the_previous_complete_one(trained_run, tmp_path, caplog):
    root = tmp_path / "run" / "checkpoints"
    shutil.copytree(trained_run / "checkpoints", root)
    trainable = root / "step-00000006" / "trainable.safetensors"
    trainable.write_bytes(trainable.read_bytes()[:1000])  # truncated
    (root / "step-00000004" / "state.json").unlink()
    with caplog.at_level(logging.WARNING, logger="memvp_ds"):
        assert ckpt.find_resume_checkpoint(str(tmp_path / "run"), "auto") == str(root / "step-00000002")
    text = caplog.text
    assert "step-00000006 is broken (trainable.safetensors is unreadable" in text
    assert "step-00000004 is broken (no state.json)" in text
    (root / "step-00000002" / "state.json").unlink()
    with pytest.raises(FileNotFoundError, match="train.resume=never"):
        ckpt.find_resume_checkpoint(str(tmp_path / "run"), "auto")


def test_incompatible_resume_stops_before_the_engine_names_the_key(dataset, trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", out / "checkpoints")
    # --debug: the traceback (normally one error line) shows where the run stopped.
    proc = run_train([*train_overrides(dataset, out, "train.max_steps=8", "model.memvp.memory_rows=32"), "--debug"],
                     check=False)
    assert proc.returncode != 0
    assert "model.memvp.memory_rows=24" in proc.stderr and "model.memvp.memory_rows=32" in proc.stderr
    assert "check_compatible" in proc.stderr and "_build_engine" not in proc.stderr, "stopped before the engine"
    cfg = tiny_config("memvp", "model.memvp.dropout=0.0", "model.llm.dtype=bfloat16", "model.apt.rank=8")
    ckpt.check_compatible(str(out / "checkpoints" / "step-00000006"), cfg)  # no effect on the tensors: allowed
    for override, key in (("model.llm.config.hidden_size=128", "model.llm.config"), ("model.visual_dim=48", "model.visual_dim"),
                          ("model.strategy=input_prefix", "model.strategy"), ("train.mode=das_search", "train.mode")):
        with pytest.raises(ConfigError, match=key):
            ckpt.check_compatible(str(out / "checkpoints" / "step-00000006"),
                                  tiny_config("memvp", override))


def test_resume_value_is_auto_never_or_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="train.resume: 'nevr' is not auto, never or an existing checkpoint"):
        ckpt.find_resume_checkpoint(str(tmp_path), "nevr")
    (tmp_path / "half").mkdir()
    with pytest.raises(ConfigError, match="half is not a complete checkpoint: no state.json"):
        ckpt.find_resume_checkpoint(str(tmp_path), str(tmp_path / "half"))
    assert ckpt.find_resume_checkpoint(str(tmp_path), "never") is None
    assert ckpt.find_resume_checkpoint(str(tmp_path), "auto") is None


def test_non_finite_losses_stop_the_run_and_keep_latest_healthy(dataset, tmp_path):
    """A learning rate that overflows the weights: after train.max_nonfinite_steps the run stops as
    "diverged", and no checkpoint of non-finite weights was written."""
    out = tmp_path / "run"
    proc = run_train(train_overrides(dataset, out, "train.max_steps=40", "train.save_interval=1", "train.blr=1e38",
                                     "train.max_nonfinite_steps=3"), check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "diverged" and status["step"] < 40
    assert "3 optimizer steps in a row" in proc.stderr and "train.max_nonfinite_steps" in proc.stderr
    latest = ckpt.find_resume_checkpoint(str(out), "auto")  # step 1's loss was finite; later ones were not
    assert latest == str(out / "checkpoints" / "step-00000001"), latest
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(latest, "trainable.safetensors")).values())


# -- 5. pre-flight ----------------------------------------------------------------------------------------

def test_output_dir_must_be_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="train.output_dir: cannot write to .*file/run"):
        check_writable(str(blocker / "run"), "train.output_dir")
    check_writable(str(tmp_path / "new" / "run"), "train.output_dir")
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())


def test_tokenizer_larger_than_the_llm_vocabulary_is_rejected(dataset):
    cfg = tiny_config("memvp", "model.llm.config.vocab_size=300")
    tokens = len(load_tokenizer(dataset["tokenizer"]))
    with pytest.raises(ConfigError, match=rf"has {tokens} tokens but the LLM \(model.llm.config\) has vocab_size 300"):
        check_vocab_fits(tokens, dataset["tokenizer"], cfg.model.llm)
    check_vocab_fits(tokens, dataset["tokenizer"], tiny_config("memvp").model.llm)
