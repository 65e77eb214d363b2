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
SLURM_TEST_SKIP=1. The cluster is conftest.py's `two_nodes` fixture.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SBATCH = Path(__file__).with_name("two_node_allreduce.sbatch")


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
