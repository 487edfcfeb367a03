"""A real Slurm cluster with two emulated nodes on this machine (see shared docs/slurm-local.md)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

SLURM_CONF = """ClusterName=local
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={state}/state
SlurmctldPidFile={state}/slurmctld.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdPidFile={state}/slurmd-%n.pid
SlurmdSpoolDir={state}/spool-%n
SlurmdLogFile={state}/slurmd-%n.log
SlurmctldPort=16817
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=3600
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port=17001 CPUs=1 RealMemory=8000
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port=17002 CPUs=1 RealMemory=8000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class SlurmUnavailable(RuntimeError):
    pass


def _run(cmd: List[str], env=None, check=True, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=check, timeout=timeout)


def _install() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and this user cannot apt-get install them")
    _run(["apt-get", "update", "-qq"], timeout=300)
    _run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], timeout=600)


def _start_munge() -> None:
    if _run(["bash", "-c", "munge -n | unmunge"], check=False).returncode == 0:
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    for folder in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        os.makedirs(folder, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    _run(["runuser", "-u", "munge", "--", "munged"])
    if _run(["bash", "-c", "munge -n | unmunge"], check=False).returncode != 0:
        raise SlurmUnavailable("munged started but munge -n | unmunge fails")


def _ensure_hosts() -> None:
    hosts = Path("/etc/hosts")
    if "n1 n2" not in hosts.read_text():
        with hosts.open("a") as f:
            f.write("127.0.0.1 n1 n2\n")


class LocalSlurm:
    def __init__(self, state_dir: Path):
        self.state = state_dir
        self.conf = state_dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> "LocalSlurm":
        if os.geteuid() != 0:
            raise SlurmUnavailable("a local Slurm cluster needs root (slurmd runs jobs as their users)")
        _install()
        _start_munge()
        _ensure_hosts()
        (self.state / "state").mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(SLURM_CONF.format(host=host, state=self.state))
        _run(["slurmctld"], env=self.env)
        for node in ("n1", "n2"):
            _run(["slurmd", "-N", node], env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            states = _run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, check=False).stdout.split()
            if len(states) == 2 and all(s == "idle" for s in states):
                return self
            time.sleep(0.5)
        self.stop()
        raise SlurmUnavailable(f"nodes did not become idle: {states}; see {self.state}/*.log")

    def stop(self) -> None:
        for pid_file in self.state.glob("*.pid"):
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except ProcessLookupError:  # that daemon has already exited: nothing left to stop
                continue

    def sbatch(self, args: List[str], env: Optional[Dict[str, str]] = None) -> str:
        proc = _run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})})
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        out = _run(["scontrol", "show", "job", "-o", job_id], env=self.env, check=False).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job(job_id).get("JobState", "")
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout}s")

    def command(self, *args: str) -> str:
        return _run(list(args), env=self.env).stdout
