"""A throw-away TWO-node SLURM cluster on this one machine, for tests.

What it builds (everything is torn down by `stop()`, also after a failed `start()`):

- two network namespaces `sedslurm-<hex>-1` / `-2` joined by one veth pair that is
  created directly inside them (`ip link add ... netns`), with private addresses that
  exist only there: 10.A.B.1/24 (node 1) and 10.A.B.2/24 (node 2), loopback up in both.
  The host's own interfaces and routes are never touched;
- one `slurmd -N sednode<i>` per namespace, each in its own UTS namespace whose hostname
  is its NodeName (`nsenter --net=<ns> unshare --uts`), NodeAddr = the namespace address,
  the same SlurmdPort in both (different network stacks); spool, pid and log files per
  node (`%n` in slurm.conf);
- `slurmctld` in namespace 1 (hostname sednode1, SlurmctldHost=sednode1(10.A.B.1)), so
  both nodes reach it over the veth; it runs there next to node 1's slurmd, as a
  controller on a compute node;
- `munged` in the host namespace: its socket is a file in the temp dir, and a unix socket
  path is reachable from every network namespace, so both slurmds and every client share
  one munged and one key;
- shared storage: the test's temp dir (one filesystem, visible in every namespace);
- a node that stops answering is declared DOWN within about 10 s (SlurmdTimeout=5,
  MessageTimeout=3; production defaults are minutes), so a killed node (`kill_node`)
  fails or requeues its job quickly; `restart_slurmd` brings it back. KillWait=2.

Client commands (sbatch, scontrol, ...) run inside namespace 1 (`client_argv`), the only
place besides namespace 2 where the cluster's addresses exist. Names are NodeNames only;
nothing resolves them (no hosts file is written): SLURM uses NodeAddr, and jobs map a
NodeName to its address with `scontrol show node` (examples/slurm/lib/rendezvous.sh).

`two_node_skip_reason()` says why such a cluster cannot be built here (not root, no
iproute2 and no apt to install it, the kernel refusing `ip netns add`), else None.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from tests.slurm.slurm_harness import SlurmCluster, common_conf, ensure_packages, total_memory_mb

NODE_NAMES = ("sednode1", "sednode2")


def _sh(argv, timeout=20) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)


def two_node_skip_reason() -> tuple[Optional[str], float]:
    """(None, seconds spent installing iproute2) when namespaces can be built, else (reason, seconds)."""
    if os.geteuid() != 0:
        return "network namespaces need root", 0.0
    reason, spent = ensure_packages(("ip",), ("iproute2",))
    if reason:
        return reason, spent
    probe = f"sedprobe-{secrets.token_hex(3)}"
    try:
        res = _sh(["ip", "netns", "add", probe])
    except subprocess.TimeoutExpired:
        return "`ip netns add` hung", spent
    if res.returncode != 0:
        return f"the kernel refuses network namespaces: `ip netns add` said {res.stderr.strip()!r}", spent
    _sh(["ip", "netns", "del", probe])
    return None, spent


def _uts_works() -> bool:
    try:
        return _sh(["unshare", "--uts", "true"]).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class TwoNodeCluster(SlurmCluster):
    """Nodes sednode1 and sednode2 (one namespace each, `cpus` CPUs each) in partition `debug`."""

    def __init__(self, root: Path, cpus: int = 1):
        super().__init__(root, cpus=cpus)
        suffix = secrets.token_hex(3)
        self.netns = tuple(f"sedslurm-{suffix}-{i}" for i in (1, 2))
        self.veth = (f"sed{suffix}a", f"sed{suffix}b")  # <= 15 characters
        net = f"10.{200 + int(suffix[:2], 16) % 50}.{int(suffix[2:4], 16)}"
        self.addrs = (f"{net}.1", f"{net}.2")
        self.nodes = NODE_NAMES
        self.uts = _uts_works()  # hostnames = NodeNames; without it both keep this machine's
        self.node = self.nodes[0]
        self.ctl_host = self.nodes[0] if self.uts else self.hostname_here()
        self._made_netns: list[str] = []

    @staticmethod
    def hostname_here() -> str:
        return os.uname().nodename

    # -- network
    def _ip(self, *args):
        res = _sh(["ip", *args])
        if res.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)} failed: {res.stderr.strip()}")

    def _make_network(self):
        for ns in self.netns:
            self._ip("netns", "add", ns)
            self._made_netns.append(ns)
        # Both ends are born inside their namespaces: the host never sees the pair.
        self._ip(
            "link",
            "add",
            self.veth[0],
            "netns",
            self.netns[0],
            "type",
            "veth",
            "peer",
            "name",
            self.veth[1],
            "netns",
            self.netns[1],
        )
        for ns, dev, addr in zip(self.netns, self.veth, self.addrs):
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            self._ip("-n", ns, "link", "set", dev, "up")

    def in_node(self, i: int, argv, hostname: Optional[str] = None) -> list:
        """argv run inside node i's network namespace (and a UTS namespace named `hostname`)."""
        # nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup mount slurmd wants.
        pre = ["nsenter", f"--net=/run/netns/{self.netns[i]}", "--"]
        if hostname and self.uts:
            pre += ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', hostname]
        return pre + [str(a) for a in argv]

    def netns_inode(self, i: int) -> int:
        return os.stat(f"/run/netns/{self.netns[i]}").st_ino

    # -- setup
    def _write_conf(self):
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            (self.root / "spool" / n).mkdir(exist_ok=True)
        mem = max(total_memory_mb() // 4, 512)
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={a} NodeHostname={n if self.uts else self.hostname_here()} "
            f"CPUs={self.cpus} RealMemory={mem} State=UNKNOWN"
            for n, a in zip(self.nodes, self.addrs)
        )
        # Fixed ports are fine: every daemon listens inside a fresh namespace.
        self.conf.write_text(f"""\
# Generated by tests/slurm/two_node_harness.py for a throw-away two-node test cluster.
ClusterName=sedtest2
SlurmctldHost={self.ctl_host}({self.addrs[0]})
SlurmctldPort=6817
SlurmdPort=6818
SrunPortRange=60001-60999
SlurmdSpoolDir={self.root}/spool/%n
SlurmdPidFile={self.root}/slurmd.%n.pid
SlurmdLogFile={self.root}/log/slurmd.%n.log
{common_conf(self.root, self.munge_socket, slurmd_timeout=5, message_timeout=3, kill_wait=2)}\
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def start(self, timeout: float = 60):
        try:
            self._make_network()
            return super().start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_slurm(self):
        self._spawn("slurmctld", self.in_node(0, ["slurmctld", "-D", "-i", "-f", self.conf], self.ctl_host))
        for i, n in enumerate(self.nodes):
            self._spawn(f"slurmd-{n}", self.in_node(i, ["slurmd", "-D", "-N", n, "-f", self.conf], n))

    def node_idle(self) -> bool:
        res = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10)
        states = dict(line.split()[:2] for line in res.stdout.splitlines() if len(line.split()) >= 2)
        return res.returncode == 0 and all(states.get(n, "").startswith("idle") for n in self.nodes)

    def client_argv(self, argv) -> list:
        return self.in_node(0, argv)

    # -- faults
    def node_pids(self, i: int) -> list[int]:
        """Every process in node i's network namespace: its slurmd, job steps, ranks, helpers."""
        res = _sh(["ip", "netns", "pids", self.netns[i]])
        return [int(p) for p in res.stdout.split() if p.isdigit()]

    def rank_pids(self, i: int, marker: str = "megatron_sed.train") -> list[int]:
        """The training ranks on node i: processes whose command line holds `marker` and whose
        parent is slurmstepd (lib/rank.sh execs the trainer, so the task *is* the rank; its
        own children, e.g. the checkpoint writer's helpers, are not ranks)."""
        out = []
        for pid in self.node_pids(i):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                parent = Path(f"/proc/{ppid}/comm").read_text().strip()
            except (OSError, ValueError, IndexError):
                continue
            if marker in cmd and parent.startswith("slurmstepd"):
                out.append(pid)
        return out

    def kill_node(self, i: int) -> list[int]:
        """Node i dies: SIGKILL every process in its namespace (slurmd, slurmstepd, ranks and
        their helpers) at once; the namespace, its address and the shared files remain, so
        peers see their connections reset, and slurmctld sees a node that no longer answers."""
        pids = self.node_pids(i)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc = self.procs.get(f"slurmd-{self.nodes[i]}")
        if proc is not None:
            proc.wait(timeout=10)
        return pids

    def restart_slurmd(self, i: int, timeout: float = 60):
        """Start node i's slurmd again (a node back from a reboot) and wait until both nodes are
        idle (ReturnToService=2 returns a DOWN node to service when it registers)."""
        n = self.nodes[i]
        self._spawn(f"slurmd-{n}", self.in_node(i, ["slurmd", "-D", "-N", n, "-f", self.conf], n))
        self._wait(self.node_idle, timeout, f"{n} to be idle again")

    # -- teardown
    def stop(self):
        try:
            super().stop()
        finally:
            for ns in self._made_netns:
                # Whatever still runs in a namespace was started by this cluster (job steps).
                res = _sh(["ip", "netns", "pids", ns])
                for pid in (int(p) for p in res.stdout.split() if p.isdigit()):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for ns in reversed(self._made_netns):
                deadline = time.monotonic() + 10
                while _sh(["ip", "netns", "del", ns]).returncode != 0 and time.monotonic() < deadline:
                    time.sleep(0.2)  # deleting a namespace also deletes its veth end
            self._made_netns.clear()

    def leftovers(self) -> list[str]:
        """Namespaces or veth ends of this cluster still present (empty after stop())."""
        names = set(_sh(["ip", "netns", "list"]).stdout.split())
        links = _sh(["ip", "-o", "link", "show"]).stdout
        return [n for n in self.netns if n in names] + [
            v for v in self.veth if f" {v}@" in links or f" {v}:" in links
        ]
