"""A throw-away single-node SLURM cluster for tests: munged, slurmctld and slurmd run
as children of the test process from a temporary directory (own munge socket and key,
own ports, own state), so the machine's configuration is never touched.

Debian/Ubuntu's `slurm-wlm` and `munge` are installed with apt-get when missing and
allowed (root, apt-get present); otherwise `ensure_slurm()` says why not.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_packages(commands, packages, timeout: float = 300) -> tuple[Optional[str], float]:
    """(None, seconds spent installing) when every command in `commands` is on PATH
    (installing the Debian `packages` with apt-get when missing), else (reason, seconds)."""
    if all(shutil.which(d) for d in commands):
        return None, 0.0
    names = " ".join(packages)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{names} not installed and apt-get cannot install them (needs root and apt)", 0.0
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    start = time.monotonic()
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:  # a fresh image has no package lists yet
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=timeout)
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"apt-get install {names} took over {timeout:.0f} s", time.monotonic() - start
    spent = time.monotonic() - start
    if res.returncode != 0 or not all(shutil.which(d) for d in commands):
        return f"apt-get install {names} failed: {res.stderr.strip()[-300:]}", spent
    return None, spent


def ensure_slurm(timeout: float = 300) -> tuple[Optional[str], float]:
    """(None, seconds spent installing) when SLURM and munge are usable, else (reason, seconds)."""
    return ensure_packages(DAEMONS, ("slurm-wlm", "munge"), timeout)


def common_conf(
    root: Path, munge_socket: Path, slurmd_timeout: int = 30, message_timeout: int = 10, kill_wait: int = 5
) -> str:
    """The slurm.conf lines every test cluster shares (auth, plugins, scheduling).

    proctrack/pgid, not linuxproc: linuxproc follows parent links, so it loses a killed
    rank's helper processes (Megatron's checkpoint writer, multiprocessing's resource
    tracker) once they are reparented to init; they keep the task's stdout open and
    slurmstepd then waits 60 s for that I/O before it gives up, so a lost rank would end
    the job a minute late. Those helpers stay in the task's process group, which pgid
    signals as a whole (as proctrack/cgroup, the usual production choice, signals the
    task's cgroup). `slurmd_timeout` / `message_timeout`: how soon slurmctld declares a
    silent node DOWN (about 2-3 x MessageTimeout after its last answer, at least
    SlurmdTimeout). `kill_wait`: SIGTERM to SIGKILL when SLURM ends a step (30 s by
    default): processes that ignore SIGTERM, like the checkpoint writer's helper, hold a
    finished step that long."""
    return f"""\
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmctldPidFile={root}/slurmctld.pid
SlurmctldLogFile={root}/log/slurmctld.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait={kill_wait}
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout={slurmd_timeout}
MessageTimeout={message_timeout}
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
"""


def total_memory_mb() -> int:
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // (1 << 20)


class SlurmCluster:
    """One node (this machine) with `cpus` CPUs in partition `debug`."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = socket.gethostname()
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- setup
    def _write_munge(self):
        mdir = self.root / "munge"
        mdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self.munge_socket = mdir / "munge.socket"

    def _write_conf(self):
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
# Generated by tests/slurm/slurm_harness.py for a throw-away test cluster.
ClusterName=sedtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmdSpoolDir={self.root}/spool
SlurmdPidFile={self.root}/slurmd.pid
SlurmdLogFile={self.root}/log/slurmd.log
{common_conf(self.root, self.munge_socket)}\
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={max(total_memory_mb() // 2, 512)} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _spawn(self, name, argv):
        log = open(self.root / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def start(self, timeout: float = 60):
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_munge()
        self._write_conf()
        self._start_munged()
        self._start_slurm()
        self._wait(self.node_idle, timeout, "slurmd to register as idle")
        return self

    def _start_munged(self):
        m = self.root / "munge"
        self._spawn(
            "munged",
            [
                "munged",
                "-F",
                "-f",
                f"--socket={self.munge_socket}",
                f"--key-file={m / 'munge.key'}",
                f"--pid-file={m / 'munged.pid'}",
                f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), 15, "munged")

    def _start_slurm(self):
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])

    def node_idle(self) -> bool:
        res = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        return res.returncode == 0 and res.stdout.strip().startswith("idle")

    def _wait(self, cond, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}: {self.logs()}")
            if cond():
                return
            time.sleep(0.3)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}: {self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")) + sorted((self.root / "munge").glob("*.log")):
            out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def stop(self):
        try:
            self.run(["scancel", "--full", "-u", "root"], check=False, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for name in reversed(list(self.procs)):  # started munged, slurmctld, slurmd(s): stop in reverse
            p = self.procs[name]
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    # -- client commands
    def client_argv(self, argv) -> list:
        """How a SLURM client command is run against this cluster (as is here)."""
        return [str(a) for a in argv]

    def run(self, argv, check=True, **kw):
        kw.setdefault("timeout", 60)
        res = subprocess.run(
            self.client_argv(argv),
            env={**self.env, **kw.pop("env", {})},
            capture_output=True,
            text=True,
            **kw,
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} failed ({res.returncode}): {res.stderr}")
        return res

    def sbatch(self, argv, env=None) -> int:
        res = self.run(["sbatch", "--parsable", *map(str, argv)], env=env or {})
        return int(res.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> dict:
        res = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        fields = {}
        for tok in res.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields[k] = v
        return fields

    def wait_restarted(self, job_id: int, timeout: float = 90) -> dict:
        """Wait until a requeued job runs again (Restarts > 0, RUNNING or done); returns its state.

        SLURM holds a requeued job for ~2 minutes (BeginTime); this releases it early, but
        not within the second of the requeue: slurmd revokes the killed run's job credential
        with 1-second resolution, and a relaunch in that same second fails the job at launch
        (seen in CI: FAILED, ExitCode 1:0, RunTime 0). It also waits for the nodes to be idle
        again (the killed run's steps cleaned up)."""
        deadline = time.monotonic() + timeout
        held_since = None
        while True:
            state = self.job_state(job_id)
            if state.get("Restarts", "0") != "0" and state.get("JobState") in (
                "RUNNING",
                "COMPLETED",
                "FAILED",
                "CANCELLED",
            ):
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} not requeued and restarted after {timeout} s: {state}\n{self.logs()}"
                )
            if state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime":
                held_since = held_since or time.monotonic()
                if time.monotonic() - held_since > 2.5 and self.node_idle():
                    self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
            time.sleep(0.3)

    def wait_job(
        self,
        job_id: int,
        states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
        timeout: float = 300,
        poll: float = 0.5,
    ) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job_state(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(
            f"job {job_id} not in {states} after {timeout} s: {self.job_state(job_id)}\n{self.logs()}"
        )
