"""`sbatch --nodes 2 --ntasks-per-node 1` on a real two-node SLURM cluster built on this
machine from two network namespaces (two_node_harness.py): one task per node runs a gloo
all_reduce with the other (two_node_allreduce.sbatch / .py), rendezvous from
SLURM_JOB_NODELIST through examples/slurm/lib/rendezvous.sh.

Checks the sum, that the tasks ran on different NodeNames (and hostnames) in different
network namespaces (the cluster's own two, not the test's), LOCAL_RANK 0 on both, the
rendezvous address (node 1's NodeAddr) and the interface the helper chose on each node.
Then that the namespaces and the veth pair are gone.

Needs root, iproute2 (apt-installed when missing), namespaces from the kernel and
slurm-wlm + munge (apt-installed when missing); skips with the reason otherwise, or with
SLURM_TEST_SKIP=1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from slurm_harness import ensure_slurm
from two_node_harness import TwoNodeCluster, two_node_skip_reason

REPO = Path(__file__).resolve().parents[2]
SBATCH = Path(__file__).with_name("two_node_allreduce.sbatch")
# What the job must decide for itself, not inherit from the test's environment.
INHERITED = ("MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "SED_SOCKET_IFNAME")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    if os.environ.get("SLURM_TEST_SKIP") == "1":
        pytest.skip("SLURM_TEST_SKIP=1")
    reason, seconds = two_node_skip_reason()
    if reason:
        pytest.skip(reason)
    print(f"\niproute2 install: {seconds:.1f} s")
    reason, seconds = ensure_slurm()
    if reason:
        pytest.skip(reason)
    print(f"slurm-wlm/munge install: {seconds:.1f} s")
    c = TwoNodeCluster(tmp_path_factory.mktemp("slurm2"), cpus=1)
    for k in list(c.env):
        if k in INHERITED or (k.startswith("SLURM_") and k != "SLURM_CONF"):
            del c.env[k]
    t = time.monotonic()
    try:
        c.start(timeout=60)
        print(
            f"two-node cluster up: {time.monotonic() - t:.1f} s ({c.netns[0]} {c.addrs[0]}, "
            f"{c.netns[1]} {c.addrs[1]}, UTS hostnames: {c.uts})"
        )
        yield c
    finally:
        t = time.monotonic()
        c.stop()
        print(f"two-node cluster down: {time.monotonic() - t:.1f} s")
    assert c.leftovers() == [], f"namespaces/veth left behind: {c.leftovers()}"


def test_two_node_sbatch_gloo_all_reduce(two_nodes, tmp_path):
    c = two_nodes
    out_dir = tmp_path / "ranks"
    out_dir.mkdir()
    log = tmp_path / "job.out"
    env = {"SED_REPO": str(REPO), "PYTHON": sys.executable, "OUT_DIR": str(out_dir), "OMP_NUM_THREADS": "1"}
    t = time.monotonic()
    job = c.sbatch(
        ["--nodes", "2", "--ntasks-per-node", "1", "--output", log, "--chdir", tmp_path, SBATCH], env=env
    )
    info = c.wait_job(job, timeout=120)
    print(f"job {job}: {info.get('JobState')} in {time.monotonic() - t:.1f} s")
    text = log.read_text() if log.exists() else ""
    print(text)
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}\n{c.logs()}"

    recs = sorted((json.loads(p.read_text()) for p in out_dir.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in recs] == [0, 1], f"{recs}\n{text}"
    for r in recs:
        print(
            f"rank {r['rank']}: torch import {r['import_s']} s, rendezvous + all_reduce {r['collective_s']} s"
        )
        assert r["world_size"] == 2
        assert r["result"] == [3.0, 11.0], r  # [1 + 2, 10**0 + 10**1]
        assert r["local_rank"] == 0, r
        assert r["master"].split(":")[0] == c.addrs[0], r  # NodeAddr of the first node
    # One task per node, each in its own node's namespace (rank i on node i: block distribution).
    assert [r["slurmd_nodename"] for r in recs] == list(c.nodes), recs
    assert [r["netns_inode"] for r in recs] == [c.netns_inode(0), c.netns_inode(1)], recs
    assert os.stat("/proc/self/ns/net").st_ino not in {r["netns_inode"] for r in recs}
    if c.uts:
        assert [r["hostname"] for r in recs] == list(c.nodes), recs
    # Node 1 owns the master address (route via lo): the veth holding it; node 2 routes to it via its veth.
    assert [r["gloo_socket_ifname"] for r in recs] == list(c.veth), recs
    assert [r["nccl_socket_ifname"] for r in recs] == list(c.veth), recs
