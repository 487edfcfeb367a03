"""slurm/*.sh on a real local Slurm cluster: two emulated nodes, real sbatch/srun/scontrol."""

import json
import re
import subprocess
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


def _submit_train(slurm, dataset, tmp_path, name, steps, *extra_sbatch, env=None):
    out, log = tmp_path / "run", tmp_path / "job.log"
    overrides = train_overrides(dataset, out, f"train.max_steps={steps}", "train.save_interval=4")
    overrides = [o for o in overrides if not o.startswith("train.output_dir=")]  # the script sets it
    args = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", f"--job-name={name}", f"--output={log}",
            *extra_sbatch, "slurm/train.sh", "tiny_memvp", *overrides]
    return slurm.sbatch(args, env={**_job_env(out), **(env or {})}), out, log


def test_two_node_training_job(slurm, dataset, tmp_path):
    # Submitted from a shell that ran a single process (sbatch exports its environment): the ranks must still
    # take their places from Slurm, not all be rank 0 of 1.
    inherited = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    job, out, log = _submit_train(slurm, dataset, tmp_path, "memvp-2node", 8, env=inherited)
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
    proc = subprocess.run(["bash", "slurm/extract.sh", "2", str(tmp_path / "parts"), *options], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    array_id, merge_id = proc.stdout.split()[-2:]
    assert slurm.wait(merge_id, timeout=300) == "COMPLETED", proc.stdout
    merged = read_manifest(str(tmp_path / "parts")).data
    single = run_extract(ScienceQASource(str(sqa)), FeatureRecipe(model=TINY_VIT, pretrained="random", image_size=64),
                         ExtractOptions(out_dir=str(tmp_path / "single"), samples_per_shard=24, num_workers=0))
    assert merged["merged_from"] == 2 and verify(str(tmp_path / "parts")) == []
    assert {s["name"]: s["sha256"] for s in merged["shards"]} == {s["name"]: s["sha256"] for s in single["shards"]}


# --- guarantees of docs/reliability.md: argument passing and requeue decisions ---------------------------

# Stands in for the program a Slurm script starts (MEMVP_PYTHON): records its argv, then plays this attempt's
# act from STAND_IN_ACTS (one per attempt, by SLURM_RESTART_COUNT): "exit0" exits 0, "crash" exits 3,
# "crash-on-stop" exits 4 on the stop signal, "preempt" does what the trainer does on the stop signal
# (rank 0 writes status.json "preempted" atomically, every rank exits 0).
STAND_IN = """#!{python}
import json, os, signal, sys, time, uuid

restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
act = os.environ["STAND_IN_ACTS"].split(",")[restart]
stopped = []
signal.signal(signal.SIGUSR1, lambda *_: stopped.append(True))
record = {{"argv": sys.argv[1:], "restart": restart, "procid": os.environ.get("SLURM_PROCID"),
          "array_task": os.environ.get("SLURM_ARRAY_TASK_ID")}}
with open(os.path.join(os.environ["STAND_IN_RECORDS"], uuid.uuid4().hex + ".json"), "w") as f:
    json.dump(record, f)  # written once the handler is in place: the test signals only after seeing it
if act == "crash":
    sys.exit(3)
if act in ("preempt", "crash-on-stop"):
    deadline = time.time() + 120
    while not stopped and time.time() < deadline:
        time.sleep(0.1)
    if act == "crash-on-stop" or not stopped:
        sys.exit(4)
    out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("train.output_dir="))
    if os.environ.get("SLURM_PROCID") == "0":
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "status.json.tmp"), "w") as f:
            json.dump({{"status": "preempted", "step": 4, "total_steps": 40}}, f)
        os.replace(os.path.join(out, "status.json.tmp"), os.path.join(out, "status.json"))
"""
# Spaces, both quote kinds, $, backquotes, a glob, a backslash and an empty argument: any re-parsing by a
# shell would change or drop one.
AWKWARD = ["model.llm.path=/ckpt/my model", "data.prompt=it's \"quoted\" $HOME `id` *", "--weights",
           "a b/'c'\\d.safetensors", ""]


def _stand_in(tmp_path, acts):
    """An executable stand-in (in a folder whose name has a space) and the environment that selects it."""
    folder, records = tmp_path / "bin dir", tmp_path / "records"
    folder.mkdir()
    records.mkdir()
    # No space in the file name itself: it becomes the process name, and the local cluster's
    # proctrack/linuxproc cannot find (so cannot signal) a process whose name holds a space.
    program = folder / "stand-in-python"
    program.write_text(STAND_IN.format(python=sys.executable))
    program.chmod(0o755)
    return {"MEMVP_PYTHON": str(program), "STAND_IN_RECORDS": str(records), "STAND_IN_ACTS": ",".join(acts)}


def _records(tmp_path):
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "records").glob("*.json"))]


def _wait_for_record(slurm, job, tmp_path, restart, log):
    deadline = time.time() + 120
    while not any(r["restart"] == restart for r in _records(tmp_path)):
        assert time.time() < deadline and slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), log.read_text()
        time.sleep(0.2)


def _settled(slurm, job, restarts, timeout=180):
    """The job's scontrol fields once it has ended, or is pending again after more than ``restarts`` requeues."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = slurm.job(job)
        state, requeues = info.get("JobState"), int(info.get("Restarts", 0))
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") or (requeues > restarts and state == "PENDING"):
            return info
        time.sleep(0.5)
    raise TimeoutError(f"job {job} neither ended nor requeued: {slurm.job(job)}")


def _sbatch_stand_in(slurm, tmp_path, env, script, *args, nodes=1):
    log = tmp_path / "job.log"
    sbatch = [f"--nodes={nodes}", "--ntasks-per-node=1", "--cpus-per-task=1", f"--output={log}", f"--chdir={REPO}",
              script, *args]
    return slurm.sbatch(sbatch, env={"MEMVP_OUTPUT_DIR": str(tmp_path / "run dir"), **env}), log


@pytest.mark.parametrize("script", ["slurm/train.sh", "slurm/eval.sh"])
def test_arguments_reach_every_rank_intact(slurm, tmp_path, script):
    env = _stand_in(tmp_path, ["exit0"])
    args = ["configs/my config's.yaml", *AWKWARD] if script == "slurm/train.sh" else AWKWARD
    job, log = _sbatch_stand_in(slurm, tmp_path, env, script, *args, nodes=2)
    assert slurm.wait(job) == "COMPLETED", log.read_text()
    if script == "slurm/train.sh":
        expected = ["memvp_ds/train.py", "--config", args[0], f"train.output_dir={tmp_path / 'run dir'}", *AWKWARD]
    else:
        expected = ["memvp_ds/evaluate.py", *AWKWARD]
    records = _records(tmp_path)
    assert sorted(r["procid"] for r in records) == ["0", "1"], log.read_text()
    assert all(r["argv"] == expected for r in records), records


def test_extract_arguments_reach_every_array_task_intact(slurm, tmp_path):
    out = tmp_path / "shards dir"
    env = {**slurm.env, **_stand_in(tmp_path, ["exit0"]), "MEMVP_EXTRACT_SBATCH_ARGS": f"--chdir={REPO}",
           "MEMVP_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run(["bash", "slurm/extract.sh", "2", str(out), *AWKWARD], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    merge_id = proc.stdout.split()[-1]
    assert slurm.wait(merge_id, timeout=120) == "COMPLETED", proc.stdout
    received = sorted((r["array_task"] or "-", r["argv"]) for r in _records(tmp_path))
    assert received == sorted([
        ("0", ["-m", "data_prep", "extract", "--out", str(out), "--part", "0/2", *AWKWARD]),
        ("1", ["-m", "data_prep", "extract", "--out", str(out), "--part", "1/2", *AWKWARD]),
        ("-", ["-m", "data_prep", "merge", str(out)]),
        ("-", ["-m", "data_prep", "verify", str(out)]),
    ])


def test_crash_after_a_preemption_fails_the_job_without_requeueing(slurm, tmp_path):
    # Attempt 0 is preempted and saves (status.json "preempted"); attempt 1 crashes without any signal.
    # That status is attempt 0's: attempt 1 must fail with the crash's exit code, not requeue on it.
    env = _stand_in(tmp_path, ["preempt", "crash"])
    job, log = _sbatch_stand_in(slurm, tmp_path, env, "slurm/train.sh", "configs/tiny_memvp.yaml")
    _wait_for_record(slurm, job, tmp_path, 0, log)
    slurm.command("scancel", "-s", "USR1", "-b", job)
    requeued = _settled(slurm, job, restarts=0)
    assert requeued.get("Restarts") == "1", log.read_text()
    time.sleep(2)  # see test_preempted_job_saves_requeues_and_resumes: not within the revocation's second
    slurm.command("scontrol", "update", f"JobId={job}", "StartTime=now")
    final = _settled(slurm, job, restarts=1)
    text = log.read_text()
    assert (final.get("JobState"), final.get("ExitCode"), final.get("Restarts")) == ("FAILED", "3:0", "1"), text
    assert text.count("requeueing job") == 1 and "ranks exited with 3, stop signal: none" in text, text


def test_stop_signal_without_a_save_in_this_attempt_fails_the_job(slurm, tmp_path):
    # A status.json "preempted" left by an earlier run; this attempt is signalled but its ranks crash
    # before saving. Only a status written by this attempt may requeue the job.
    (tmp_path / "run dir").mkdir()
    (tmp_path / "run dir" / "status.json").write_text(json.dumps({"status": "preempted", "step": 4, "total_steps": 8}))
    env = _stand_in(tmp_path, ["crash-on-stop"])
    job, log = _sbatch_stand_in(slurm, tmp_path, env, "slurm/train.sh", "configs/tiny_memvp.yaml")
    _wait_for_record(slurm, job, tmp_path, 0, log)
    slurm.command("scancel", "-s", "USR1", "-b", job)
    final = _settled(slurm, job, restarts=0)
    text = log.read_text()
    assert (final.get("JobState"), final.get("ExitCode"), final.get("Restarts")) == ("FAILED", "4:0", "0"), text
    assert "requeueing job" not in text and "run status: none written by this attempt" in text, text
