"""slurm/*.sh on a real local Slurm cluster: two emulated nodes, real sbatch/srun/scontrol."""

import json
import re
import sys
import time

import pytest

from tests.helpers import REPO, scalars, train_overrides
from tests.slurm_cluster import LocalSlurm, SlurmUnavailable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as err:
        pytest.skip(f"SLURM TESTS NOT RUN: cannot start a local Slurm cluster: {err}")
    yield cluster
    cluster.stop()


def _job_env(out_dir):
    return {"MEMVP_OUTPUT_DIR": str(out_dir), "MEMVP_PYTHON": sys.executable}


def _submit_train(slurm, dataset, tmp_path, name, steps, *extra_sbatch):
    out, log = tmp_path / "run", tmp_path / "job.log"
    overrides = train_overrides(dataset, out, f"train.max_steps={steps}", "train.save_interval=4")
    overrides = [o for o in overrides if not o.startswith("train.output_dir=")]  # the script sets it
    args = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", f"--job-name={name}", f"--output={log}",
            *extra_sbatch, "slurm/train.sh", "tiny_memvp", *overrides]
    return slurm.sbatch(args, env=_job_env(out)), out, log


def test_two_node_training_job(slurm, dataset, tmp_path):
    job, out, log = _submit_train(slurm, dataset, tmp_path, "memvp-2node", 8)
    assert slurm.wait(job) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert re.search(r"rank 0/2 on node n1", text) and re.search(r"rank 1/2 on node n2", text), text[-3000:]
    assert json.loads((out / "status.json").read_text()) == {"status": "complete", "step": 8, "total_steps": 8}
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000008"
    assert sorted(scalars(out, "train/loss")) == list(range(1, 9))
    assert slurm.job(job).get("Restarts") == "0", "a finished job must not requeue"


def test_preempted_job_saves_requeues_and_resumes(slurm, dataset, tmp_path):
    steps = 40
    job, out, log = _submit_train(slurm, dataset, tmp_path, "memvp-preempt", steps)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-00000004" / "state.json").exists():
        assert time.time() < deadline and slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), log.read_text()[-3000:]
        time.sleep(0.2)
    slurm.command("scancel", "-s", "USR1", "-b", job)  # stand-in for --signal's warning before the kill
    deadline = time.time() + 180
    while slurm.job(job).get("Restarts", "0") == "0" or slurm.job(job).get("JobState") == "RUNNING":
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    stopped = json.loads((out / "status.json").read_text())
    assert stopped["status"] == "preempted" and stopped["step"] < steps
    saved = (out / "checkpoints" / "latest").read_text().strip()
    assert saved == f"step-{stopped['step']:08d}", "the stop must save at the step it stopped at"
    # Skip the requeue back-off. Not within the second of the requeue: slurmd refuses a job whose new
    # credential carries the same timestamp (in seconds) as the revocation of the old one.
    time.sleep(2)
    slurm.command("scontrol", "update", f"JobId={job}", "StartTime=now")
    assert slurm.wait(job, timeout=300) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert "requeueing job" in text and "restart 1" in text
    assert f"at step {stopped['step']}" in text, "resumed from the saved step"
    assert json.loads((out / "status.json").read_text())["step"] == steps
    assert sorted(scalars(out, "train/loss")) == list(range(1, steps + 1)), "TensorBoard continues in one run"


def test_extract_array_job_matches_single_process(slurm, dataset, tmp_path):
    from data_prep.extract import ExtractOptions, run_extract
    from memvp_ds.data.shard_format import read_manifest
    from data_prep.sources import ScienceQASource
    from data_prep.verify import verify
    from memvp_ds.vision.clip_features import FeatureRecipe
    from tests.conftest import TINY_VIT

    sqa = dataset["root"] / "sqa"
    options = ["--source", "scienceqa", "--root", str(sqa), "--clip-model", TINY_VIT, "--clip-pretrained", "random",
               "--image-size", "64", "--samples-per-shard", "24", "--workers", "0"]
    env = {**slurm.env, "MEMVP_PYTHON": sys.executable, "MEMVP_EXTRACT_SBATCH_ARGS": f"--chdir={REPO}",
           "MEMVP_LOG_DIR": str(tmp_path / "logs")}
    import subprocess

    proc = subprocess.run(["bash", "slurm/extract.sh", "2", str(tmp_path / "parts"), *options], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    array_id, merge_id = proc.stdout.split()[-2:]
    assert slurm.wait(merge_id, timeout=300) == "COMPLETED", proc.stdout
    merged = read_manifest(str(tmp_path / "parts"))
    single = run_extract(ScienceQASource(str(sqa)), FeatureRecipe(model=TINY_VIT, pretrained="random", image_size=64),
                         ExtractOptions(out_dir=str(tmp_path / "single"), samples_per_shard=24, num_workers=0))
    assert merged["merged_from"] == 2 and verify(str(tmp_path / "parts")) == []
    assert {s["name"]: s["sha256"] for s in merged["shards"]} == {s["name"]: s["sha256"] for s in single["shards"]}
