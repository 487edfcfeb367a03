"""One writer per run folder, no orphan ranks, clean stops from the first line (SIGTERM/USR1/Ctrl-C), options
refused at load, one error line for bad exports and full disks, durable writes with the umask's permissions.
docs/reliability.md states each guarantee and names its test (issue 31's findings, re-tried)."""

import errno
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memvp_ds import ConfigError
from memvp_ds.atomic_io import DiskFullError, write_json_atomic
from memvp_ds.data.stream import DataStreamError
from memvp_ds.distributed import DistInfo
from memvp_ds.engine import checkpoint as ckpt
from memvp_ds.engine.deepspeed_config import build_ds_config
from memvp_ds.export import write_export
from memvp_ds.run_lock import LOCK_FILE, RunFolderBusy, RunLock
from memvp_ds.stop_signals import STOP, StopRequested
from tests.conftest import tiny_config, tiny_model
from tests.helpers import REPO, free_port, train_overrides

PYTHON = sys.executable


# -- helpers ---------------------------------------------------------------------------------------------

def _wait_for(predicate, proc, log: Path, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"ended before {what}:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"no {what} in time:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    """The process has ended (a zombie whose parent is gone counts as ended: it runs no more code)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _start(cmd, log: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            **kwargs)


def _status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def _error_lines(text: str):
    return [line for line in text.splitlines() if line.startswith("error:")]


# -- 1-4: real processes: start-up stop under the Slurm script, two runs, launcher killed, Ctrl-C ---------

def test_one_writer_no_orphans_and_clean_stops_from_the_first_line(dataset, tmp_path):
    """Four real runs on one output folder, in turn:
    A. slurm/train.sh (srun and scontrol stubbed) gets Slurm's USR1 warning while its rank starts up: the rank
       exits 0 with status "preempted" and nothing saved, and the script requeues the job;
    B. a torchrun job trains; a second run on the same folder is refused with one line naming the holder;
       then the launcher is SIGKILLed: its rank saves and exits instead of training on as an orphan;
    C. a plain run resumes and gets Ctrl-C (SIGINT to its group): it saves, exits 130, status "interrupted".
    Files are written with the process umask (027 here) throughout."""
    out = tmp_path / "run"
    overrides = train_overrides(dataset, out, "train.max_steps=500", "train.save_interval=1000")
    umask = lambda: os.umask(0o027)  # noqa: E731

    # A. USR1 to the batch script during start-up (after the process group, during the model build).
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (stubs / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "t",
           "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS": "1",
           "MEMVP_OUTPUT_DIR": str(out), "MEMVP_PYTHON": PYTHON}
    log_a = tmp_path / "a.log"
    job = _start(["bash", "slurm/train.sh", "tiny_memvp", *overrides], log_a, env=env)
    _wait_for(lambda: "memvp_ds: rank 0/1" in log_a.read_text(), job, log_a, "the rank line")
    os.kill(job.pid, signal.SIGUSR1)  # the batch script only, as --signal=B:USR1 does; it forwards to srun
    assert job.wait(timeout=120) == 0, log_a.read_text()[-4000:]
    text = log_a.read_text()
    assert _status(out)["status"] == "preempted" and "during start-up" in _status(out)["reason"], text[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"], text[-3000:]
    assert "Traceback" not in text and not (out / "checkpoints").exists() and not (out / LOCK_FILE).exists()

    # B. torchrun with one rank; a second run on the same folder; then the launcher dies.
    log_b = tmp_path / "b.log"
    launcher = _start([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                       str(free_port()), "memvp_ds/train.py", "--config", "tiny_memvp", *overrides],
                      log_b, preexec_fn=umask)
    try:
        _wait_for(lambda: "step 1:" in log_b.read_text(), launcher, log_b, "step 1")
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] != launcher.pid
        second = subprocess.run([PYTHON, "memvp_ds/train.py", "--config", "tiny_memvp", *overrides], cwd=REPO,
                                capture_output=True, text=True, timeout=240)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        [line] = _error_lines(second.stderr)
        assert f"in use by another run (pid {holder['pid']} on host {holder['host']}" in line, line
        assert not _gone(holder["pid"]), "the refused run left the running one alone"
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone, not its rank
        launcher.wait()
        deadline = time.time() + 180
        while not _gone(holder["pid"]):
            assert time.time() < deadline, f"rank {holder['pid']} trains on as an orphan:\n{log_b.read_text()[-3000:]}"
            time.sleep(0.1)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if not _gone(launcher.pid) else None
    text = log_b.read_text()
    assert f"the launcher (pid {launcher.pid}) is gone" in text, text[-3000:]
    saved = _status(out)["step"]
    assert _status(out)["status"] == "preempted" and 1 <= saved < 500, text[-3000:]
    latest = out / "checkpoints" / f"step-{saved:08d}"
    assert ckpt.checkpoint_problem(str(latest)) is None and not (out / LOCK_FILE).exists()
    for path in (latest / "trainable.safetensors", latest / "rng-rank0.safetensors", latest / "state.json",
                 out / "config.yaml", out / "status.json", out / "checkpoints" / "latest"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, (path, oct(path.stat().st_mode))

    # C. Ctrl-C: the whole group gets SIGINT (the loader worker too); the run saves and exits 130.
    log_c = tmp_path / "c.log"
    run = _start([PYTHON, "memvp_ds/train.py", "--config", "tiny_memvp", *overrides], log_c)
    _wait_for(lambda: f"step {saved + 1}:" in log_c.read_text(), run, log_c, f"step {saved + 1}")
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(timeout=120) == 130, log_c.read_text()[-4000:]
    text = log_c.read_text()
    assert f"resumed from {latest} at step {saved}" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    status = _status(out)
    assert status["status"] == "interrupted" and status["step"] > saved
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{status['step']:08d}"
    assert ckpt.checkpoint_problem(str(out / "checkpoints" / f"step-{status['step']:08d}")) is None


# -- 1. the lock, in-process -----------------------------------------------------------------------------

def _lock_file(run: Path, **holder) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_FILE
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "slurm_job_id": None, "started": 0,
                                **holder}))
    return path


def test_a_live_holder_is_refused_and_a_stale_lock_is_taken_over(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        path = _lock_file(tmp_path / "a", pid=sleeper.pid)
        with pytest.raises(RunFolderBusy, match=f"in use by another run \\(pid {sleeper.pid} on host "
                                                f"{socket.gethostname()}"):
            RunLock(str(tmp_path / "a")).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with RunLock(str(tmp_path / "a")) as lock:  # its process is gone: taken over, with a warning
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(RunFolderBusy):  # held by this very process: a second acquire is refused too
            RunLock(str(tmp_path / "a")).acquire()
    assert f"process {sleeper.pid} no longer exists on this host" in caplog.text
    assert not path.exists() and not lock.held, "released on exit"

    zombie = subprocess.Popen(["true"])  # ended but not reaped, as a rank whose launcher was killed too
    while not _gone(zombie.pid):
        time.sleep(0.01)
    _lock_file(tmp_path / "z", pid=zombie.pid)
    RunLock(str(tmp_path / "z")).acquire().release()
    zombie.wait()
    assert f"process {zombie.pid} no longer exists on this host" in caplog.text

    path = _lock_file(tmp_path / "b", host="node-elsewhere", pid=123, slurm_job_id="77")
    with pytest.raises(RunFolderBusy, match="pid 123 on host node-elsewhere, Slurm job 77"):
        RunLock(str(tmp_path / "b"), stale_after_s=600).acquire()  # another host, fresh heartbeat
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # a requeued attempt of the same job takes its own lock back
    RunLock(str(tmp_path / "b")).acquire().release()
    monkeypatch.delenv("SLURM_JOB_ID")
    path = _lock_file(tmp_path / "c", host="node-elsewhere", pid=123)
    os.utime(path, (time.time() - 1000, time.time() - 1000))
    lock = RunLock(str(tmp_path / "c"), heartbeat_s=0.05, stale_after_s=600).acquire()
    assert "its heartbeat is 1000 s old" in caplog.text
    os.utime(path, (time.time() - 1000, time.time() - 1000))
    deadline = time.time() + 30
    while time.time() - path.stat().st_mtime > 100:  # the heartbeat renews it
        assert time.time() < deadline, "no heartbeat"
        time.sleep(0.05)
    _lock_file(tmp_path / "c", host="node-elsewhere", pid=9)  # taken over meanwhile by another run:
    lock.release()
    assert path.exists(), "a run leaves alone a lock that is no longer its own"


# -- 3. Ctrl-C twice, in-process ---------------------------------------------------------------------------

def test_stop_signals_are_recorded_and_a_second_ctrl_c_aborts_at_once(capsys):
    from memvp_ds.cli import command

    before = signal.getsignal(signal.SIGINT)
    STOP.install()
    try:
        with pytest.raises(StopRequested, match="SIGTERM"):
            with STOP.immediate():  # start-up: ends at once
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        STOP.restore()
        STOP.install()
        os.kill(os.getpid(), signal.SIGINT)  # in a step: recorded, the loop stops at its boundary
        assert STOP.raised == "SIGINT"
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        STOP.restore()
    assert signal.getsignal(signal.SIGINT) is before

    @command
    def aborted(argv):
        raise KeyboardInterrupt("second Ctrl-C: aborted without saving")

    assert aborted([]) == 130
    assert capsys.readouterr().err.strip() == "error: interrupted (second Ctrl-C: aborted without saving)"


# -- 5. nonsense settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("train.epochs=0", "train.epochs must be > 0"), ("train.epochs=-1", "train.epochs must be > 0"),
    ("train.weight_decay=-1", "train.weight_decay must be >= 0"), ("train.grad_clip=-1", "train.grad_clip must"),
    ("train.warmup_epochs=-1", "train.warmup_epochs must"), ("eval.interval=-1", "eval.interval must be >= 0"),
    ("train.blr=-1", "train.blr must be > 0"), ("logging.log_interval=0", "logging.log_interval must be >= 1"),
    ("model.projector.hidden_dim=0", "model.projector.hidden_dim must be >= 1"),
    ("train.blr=nan", "train.blr must be"), ("train.min_lr=inf", "train.min_lr must be a finite number"),
    ("model.memvp.memory_scale=nan", "model.memvp.memory_scale must be a finite number"),
    ("train.adam_betas=[0.9,1.5]", "train.adam_betas must lie in"), ("logging.peak_tflops=0", "logging.peak_tflops"),
])
def test_nonsense_setting_is_refused_at_load_naming_the_option(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        tiny_config("memvp", override)


def test_nonsense_settings_are_one_line_before_anything_runs(dataset, tmp_path, monkeypatch, capsys):
    """Through memvp-train itself: one line, exit 2, nothing written; min_lr is compared with the lr of the
    run's world size; a sequence length that leaves no answer token stops before the first step."""
    from memvp_ds.train import main as train

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    base = train_overrides(dataset, out, "train.blr=0.01")  # lr = 0.01 * 4 / 256 = 1.5625e-4 on one rank
    for extra, needle in (("train.blr=-1", "train.blr must be > 0, got -1"),
                          ("train.min_lr=0.001", "train.min_lr=0.001 is above the learning rate it decays from"),
                          ("logging.log_interval=0", "logging.log_interval must be >= 1")):
        assert train(["--config", "tiny_memvp", *base, extra]) == 2
        captured = capsys.readouterr()
        [line] = _error_lines(captured.err)
        assert needle in line and "Traceback" not in captured.err, captured.err[-2000:]
    assert not out.exists()
    build_ds_config(tiny_config("memvp", "train.blr=0.01", "train.min_lr=0.0003"), 2)  # below 2 ranks' lr: fine
    assert train(["--dry-run", "--config", "tiny_memvp", *base, "data.max_seq_len=1"]) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert "no answer token is left after truncation to data.max_seq_len=1" in line, line


def test_no_training_sample_with_a_supervised_token_stops_before_the_first_step(dataset):
    """data.max_seq_len=1 once trained 40 steps at loss 0: now every sample is unusable (counted), and the
    stream stops with one error naming shard, key and cause before any batch is formed."""
    from memvp_ds.data.collate import SampleEncoder
    from memvp_ds.data.stream import ErrorBudget, TrainStream, _Collate
    from memvp_ds.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(dataset["tokenizer"])
    encoder = SampleEncoder(tokenizer, "qcm_a", 1, 16, 32)
    collate = _Collate(tokenizer.pad_token_id, encoder.feature_shape, 8, left_pad=False)
    stream = TrainStream(dataset["train"].split("::"), encoder, 4, collate, seed=0, rank=0, world_size=1,
                         num_workers=0, shuffle_buffer=8, budget=ErrorBudget(max_in_row=10))
    with pytest.raises(DataStreamError) as err:
        next(iter(stream))
    assert "10 samples in a row" in str(err.value) and "shards/train-0000" in str(err.value)
    assert "no answer token is left after truncation to data.max_seq_len=1" in str(err.value)


# -- 6. one line for bad exports, choices, lengths, a full disk ---------------------------------------------

def test_bad_exports_choices_and_lengths_are_one_error_line(dataset, tmp_path, capsys):
    from memvp_ds.evaluate import main as evaluate
    from memvp_ds.predict import main as predict

    good = tmp_path / "good.safetensors"
    model = tiny_model("memvp")
    write_export({k: v.detach().clone() for k, v in model.trainable_parameters().items()}, str(good),
                 tiny_config("memvp", f"data.tokenizer={dataset['tokenizer']}"), dataset["manifest"]["recipe"])
    data = good.read_bytes()
    bad = {"empty": b"", "truncated": data[: len(data) // 2], "random": os.urandom(4096)}
    for name, content in bad.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        for main, argv in ((evaluate, ["--weights", str(path), "--shards", dataset["test"], "--output",
                                       str(tmp_path / "eval")]),
                           (predict, ["--weights", str(path), "--question", "q?"])):
            assert main(argv) == 2, name
            err = capsys.readouterr().err
            [line] = _error_lines(err)
            assert f"{path} is not a readable safetensors export" in line and "Traceback" not in err, (name, err)
    for argv, needle in ((["--choices", *[f"c{i}" for i in range(27)]], "--choices: 27 options, at most 26"),
                         (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
                         (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1, got -3")):
        assert predict(["--weights", str(good), "--question", "q?", *argv]) == 2
        [line] = _error_lines(capsys.readouterr().err)
        assert needle in line, line
    from memvp_ds.data.prompts import build_segments

    with pytest.raises(ValueError, match="choices: 30 options, at most 26"):  # a stored sample: skipped, counted
        build_segments({"question": "q", "choices": ["x"] * 30, "answer": 0}, "qcm_a")


@pytest.fixture
def small_disk(tmp_path):
    """A 128 KiB tmpfs where this test may mount one (root); else None (the caller uses a file-size limit)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


def test_disk_full_during_a_save_is_one_line_and_status_failed(dataset, tmp_path, small_disk):
    """A run whose first checkpoint does not fit: one `error:` line naming the file and the space needed, and
    status.json (which said "complete" from an earlier run) says "failed" with that reason."""
    out = (small_disk or tmp_path) / "run"
    out.mkdir()
    write_json_atomic(str(out / "status.json"), {"status": "complete", "step": 8, "total_steps": 8})
    preexec = None if small_disk else _limit_file_size(100_000)
    proc = subprocess.run([PYTHON, "memvp_ds/train.py", "--config", "tiny_memvp",
                           *train_overrides(dataset, out, "train.max_steps=2", "train.save_interval=1")],
                          cwd=REPO, capture_output=True, text=True, timeout=240, preexec_fn=preexec)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    [line] = _error_lines(proc.stderr)
    assert "cannot write " in line and "trainable.safetensors: no space left" in line, line
    assert "it needs about 18" in line and "free on its file system" in line, line  # 184 KiB of tensors
    status = _status(out)
    assert status["status"] == "failed" and status["reason"] == line[len("error: "):], status
    assert not (out / LOCK_FILE).exists()


def test_export_write_is_durable_atomic_and_uses_the_umask(tmp_path, small_disk, monkeypatch):
    """Every rename that makes an export or a checkpoint visible comes after an fsync of the file, and is
    followed by an fsync of the folder; files get the umask's mode; a full disk leaves the old export."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                  real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    cfg = tiny_config("memvp")
    tensors = {k: v.detach().clone() for k, v in tiny_model("memvp").trainable_parameters().items()}
    path = tmp_path / "export" / "trainable.safetensors"
    old = os.umask(0o002)
    try:
        write_export(tensors, str(path), cfg)
        assert events == [("fsync", f"{path}.tmp"), ("replace", f"{path}.tmp", str(path)),
                          ("fsync", str(path.parent))], events
        assert stat.S_IMODE(path.stat().st_mode) == 0o664
        events.clear()
        monkeypatch.setattr(ckpt, "gather_trainable", lambda model, optimizer: {"param/x": torch.ones(4)})
        monkeypatch.setattr(ckpt, "rng_state", lambda: {"cpu": torch.zeros(2)})
        ckpt.save_checkpoint(None, None, DistInfo(0, 1, 0), str(tmp_path), 3, {"optimizer_steps": 3}, keep_last=2)
    finally:
        os.umask(old)
    root, name = tmp_path / "checkpoints", "step-00000003"
    tmp = root / f".{name}.tmp"
    renames = [e for e in events if e[0] == "replace"]
    assert renames[-2:] == [("replace", str(tmp), str(root / name)), ("replace", f"{root / 'latest'}.tmp",
                                                                     str(root / "latest"))]
    before = events[: events.index(renames[-2])]
    for member in ("trainable.safetensors", "rng-rank0.safetensors", "state.json"):  # each written, then renamed
        assert ("fsync", f"{tmp / member}.tmp") in before, (member, events)
    after = events[events.index(renames[-2]) + 1:]
    assert after[0] == ("fsync", str(root)), "the folder rename is flushed before `latest` moves"
    assert events[-1] == ("fsync", str(root))
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o664 for p in (root / name).iterdir())

    if small_disk is None:
        pytest.skip("no tmpfs could be mounted here for the full-disk half")
    target = small_disk / "trainable.safetensors"
    write_export({"x": torch.ones(8)}, str(target), cfg)
    before_bytes = target.read_bytes()
    with pytest.raises(DiskFullError) as err:
        write_export({"x": torch.ones(64 * 1024)}, str(target), cfg)  # 256 KiB on a 128 KiB disk
    assert err.value.errno == errno.ENOSPC
    assert f"cannot write {target}: no space left" in str(err.value) and "it needs about 25" in str(err.value)
    assert target.read_bytes() == before_bytes and not Path(f"{target}.tmp").exists()
