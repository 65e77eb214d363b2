import os
import time

import pytest

# What a job must decide for itself, not inherit from the test's environment.
INHERITED = ("MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "SED_SOCKET_IFNAME")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A two-node SLURM cluster (two_node_harness.py), started once per test module and
    shared by its tests; skipped with the reason where it cannot be built."""
    from tests.slurm.slurm_harness import ensure_slurm
    from tests.slurm.two_node_harness import TwoNodeCluster, two_node_skip_reason

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
