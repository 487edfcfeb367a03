"""The command line tools as a new user meets them: run as subprocesses from a directory outside the
repository, --help complete, one error line per failure, and the README's tiny path from a built wheel."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, free_port, train_overrides

def _entry_point(command: str):
    """argv that runs ``command`` as pyproject.toml's [project.scripts] defines it (an installed script may
    predate a rename there)."""
    import tomllib

    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][command]
    module, function = target.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


def _run(cmd, cwd, env=None, timeout=300):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _parsers():
    """Every parser a user can ask --help of: the six commands and memvp-prep's subcommands."""
    from data_prep.cli import build_parser as prep
    from memvp_demo.demo import build_parser as demo
    from memvp_ds.evaluate import build_parser as evaluate
    from memvp_ds.predict import build_parser as predict
    from memvp_ds.serve.cli import build_parser as serve
    from memvp_ds.train import build_parser as train

    for name, build in (("memvp-train", train), ("memvp-eval", evaluate), ("memvp-predict", predict),
                        ("memvp-serve", serve), ("memvp-prep", prep), ("memvp-demo", demo)):
        parser = build()
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from ((f"{name} {sub}", p) for sub, p in action.choices.items())


def test_recipes_resolve_by_short_name_and_former_path_from_any_directory(tmp_path, monkeypatch):
    from memvp_ds.recipes import RECIPES_DIR, resolve_config_path, resolve_ds_config

    monkeypatch.chdir(tmp_path)
    tiny = os.path.join(RECIPES_DIR, "configs", "tiny_memvp.yaml")
    assert resolve_config_path("tiny_memvp") == resolve_config_path("tiny_memvp.yaml") == tiny
    assert resolve_config_path("configs/tiny_memvp.yaml") == tiny  # the former repository path
    assert resolve_ds_config("zero3") == str(REPO / "ds_configs" / "zero3.json")  # a checkout: its one copy
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_memvp.yaml").write_text("model: {strategy: apt}\n")
    assert resolve_config_path("configs/tiny_memvp.yaml") == "configs/tiny_memvp.yaml"  # a real file wins
    with pytest.raises(FileNotFoundError, match="zero9.*zero2, zero3, zero3_offload"):
        resolve_ds_config("zero9")
    with pytest.raises(FileNotFoundError, match="other/tiny_memvp.yaml"):
        resolve_config_path("other/tiny_memvp.yaml")


def test_help_lists_every_option_with_its_default_once(tmp_path):
    from memvp_ds.cli import HelpFormatter

    for name, parser in _parsers():
        formatter = HelpFormatter(name)
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            text = formatter._expand_help(action)
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help"
            if action.option_strings and not action.required and action.nargs != 0:
                assert text.count("default") == 1, f"{where}: default shown {text.count('default')} times: {text}"
        assert "--debug" in parser.format_help(), name
    helps = {}
    for command in ("memvp-train", "memvp-prep"):  # the scripts' --help from outside the repository
        proc = _run([*_entry_point(command), "--help"], cwd=tmp_path, timeout=120)
        assert proc.returncode == 0 and "--debug" in proc.stdout, command + proc.stderr
        helps[command] = proc.stdout
    # the examples keep their backslash continuations
    assert re.search(r"memvp_llama13b_sqa \\\n", helps["memvp-train"])
    assert re.search(r"--out data/synth_shards \\\n", helps["memvp-prep"])


def _one_error_line(returncode, stderr, *needles, stdout=""):
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr + stdout, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    proc = _run(["memvp-train", "--config", "tiny_memvpp"], tmp_path)
    _one_error_line(proc.returncode, proc.stderr, "tiny_memvpp", "tiny_memvp", stdout=proc.stdout)

    from data_prep.cli import main as prep
    from memvp_ds.evaluate import main as evaluate
    from memvp_ds.predict import main as predict
    from memvp_ds.train import main as train

    monkeypatch.chdir(tmp_path)
    cases = [
        (train, ["--config", "tiny_memvp", "train.ds_config=zero9"], ("train.ds_config", "zero9")),
        (evaluate, ["--weights", "absent.safetensors"], ("absent.safetensors",)),
        (predict, ["--weights", "absent.safetensors", "--question", "q?"], ("absent.safetensors",)),
        (prep, ["tokenizer", "--source", "scienceqa", "--root", "nowhere", "--out", "t"], ("nowhere",)),
    ]
    for main, argv, needles in cases:
        code = main(argv)
        out = capsys.readouterr()
        _one_error_line(code, out.err, *needles, stdout=out.out)
        assert "rank 0/1" not in out.out  # reported before any process group
    with pytest.raises(FileNotFoundError, match="tiny_memvpp"):  # --debug: the exception and its traceback
        train(["--debug", "--config", "tiny_memvpp"])
    monkeypatch.setenv("MEMVP_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        evaluate(["--weights", "absent.safetensors"])


def test_print_config_shows_the_resolved_config(capsys):
    from memvp_ds.train import main as train

    assert train(["--config", "tiny_memvp", "train.blr=0.25", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["blr"] == 0.25 and cfg["train"]["ds_config"] == "zero2"
    assert cfg["model"]["memvp"]["memory_rows"] == 24 and cfg["model"]["llm"]["config"]["hidden_size"] == 64


@pytest.mark.slow
def test_a_config_error_after_the_process_group_is_one_line_from_two_ranks(dataset, tmp_path):
    """deepspeed --module (the installed-package launch): both ranks fail, only rank 0 reports. The output
    folder is checked once the process group is up (the config and the shards are checked before it)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    port = str(free_port())
    proc = _run(["deepspeed", "--num_gpus", "2", "--master_port", port, "--module", "memvp_ds.train",
                 "--config", "tiny_memvp", *train_overrides(dataset, blocker / "run")], tmp_path)
    assert "rank 1/2" in proc.stdout  # the error came after the process group was up
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: train.output_dir: cannot write to {blocker / 'run'}"), \
        proc.stdout[-3000:] + proc.stderr[-3000:]


def test_config_and_shard_errors_come_before_the_process_group(tmp_path):
    """A missing data.shards is reported before any rank starts a process group or imports the engine."""
    proc = _run([sys.executable, "-m", "memvp_ds.train", "--config", "tiny_memvp"], tmp_path)
    assert proc.returncode == 2 and "memvp_ds: rank" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: data.shards: not set (the data_prep output folder holding manifest.json)"


def _readme_tiny_path():
    """The commands of the README's tiny path, backslash continuations joined, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("## The tiny path, command by command", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of a copy of the working tree (the build leaves nothing in the checkout)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    source, wheels = tmp_path / "source", tmp_path / "wheels"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                 str(source)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    return next(wheels.glob("memvp_ds-*.whl"))


def test_the_wheel_carries_the_recipes_and_the_top_level_ds_configs(wheel, tmp_path):
    """The recipes, the ZeRO settings (one copy, at the top of the repository) and the tiny CLIP config are in
    the wheel, and an unpacked wheel resolves the short names from an empty directory."""
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"memvp_ds/recipes/configs/{n}" for n in os.listdir(REPO / "memvp_ds/recipes/configs")}
    shipped |= {f"memvp_ds/recipes/ds_configs/{n}" for n in os.listdir(REPO / "ds_configs")}
    assert {"memvp_ds/recipes/ds_configs/zero2.json", "memvp_ds/recipes/ds_configs/zero3.json",
            "memvp_ds/recipes/ds_configs/zero3_offload.json"} <= shipped
    assert shipped | {"memvp_ds/vision/model_configs/tiny-vit.json"} <= names
    site, work = tmp_path / "site", tmp_path / "work"
    zipfile.ZipFile(wheel).extractall(site)
    work.mkdir()
    code = "from memvp_ds.recipes import resolve_ds_config as r; print(r('zero3')); print(r('ds_configs/zero2.json'))"
    where = _run([sys.executable, "-c", code], work, {**os.environ, "PYTHONPATH": str(site)})
    assert where.stdout.split() == [str(site / "memvp_ds/recipes/ds_configs" / name)
                                    for name in ("zero3.json", "zero2.json")], where.stderr


@pytest.mark.slow
def test_readme_tiny_path_runs_from_the_wheel_outside_the_repository(wheel, tmp_path):
    """Unpack the wheel as site-packages would and run the README's tiny path with only it importable, from
    an empty directory."""
    site, work = tmp_path / "site", tmp_path / "work"
    zipfile.ZipFile(wheel).extractall(site)
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = _run([sys.executable, "-c", "import memvp_ds.recipes as r; print(r.RECIPES_DIR)"], work, env)
    assert where.stdout.strip() == str(site / "memvp_ds" / "recipes"), where.stderr

    outputs = {}
    for command in _readme_tiny_path():
        proc = _run(["bash", "-c", command], work, env, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs[command.split()[0] + (" " + command.split()[1] if command.startswith("memvp-prep") else "")] = proc
    assert list(outputs) == ["memvp-prep synthetic", "memvp-prep extract", "memvp-prep tokenizer", "memvp-train",
                             "memvp-eval", "memvp-predict"]
    train_log = outputs["memvp-train"].stdout + outputs["memvp-train"].stderr
    assert "\r" not in train_log  # a log file gets whole lines, no progress-bar redraws
    # start summary: 160 samples / the tiny config's micro batch 8 = 20 steps, max_steps 20; trainable
    # parameters counted from the config: projector 32*128+128 + 128*64+64, memory 2 x 24 rows x 64
    assert "160 training samples, 20 steps/epoch, 20 steps in all" in train_log
    assert f"trainable parameters: {12480 + 3072:,} (strategy.projector 12,480, strategy.memory 3,072)" in train_log
    assert "micro-batches: packed into rows of up to 128 text positions (data.packing)" in train_log
    assert f"export: {work / 'tiny/run/export/trainable.safetensors'}" in train_log
    assert "status: complete at step 20/20" in train_log and "tensorboard --logdir" in train_log
    assert "data.train_shards=tiny/shards/train-{000000..000001}.tar" in outputs["memvp-prep extract"].stdout
    eval_log = outputs["memvp-eval"].stdout + outputs["memvp-eval"].stderr
    assert "generate: 16/" not in eval_log and re.search(r"generate: 16 samples", eval_log) and "\r" not in eval_log
    assert (work / "tiny/run/eval/metrics_test.json").is_file()
    assert "parsed answer:" in outputs["memvp-predict"].stdout
