"""One task of two_node_allreduce.sbatch: a gloo all_reduce over env:// (MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE), then a JSON record of where it ran in $OUT_DIR."""

import datetime
import json
import os
import socket
import time

start = time.monotonic()
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

imported = time.monotonic()
dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
x = torch.tensor([float(rank + 1), 10.0**rank])
dist.all_reduce(x)  # sum: [1 + 2 + ..., 1 + 10 + ...]
dist.barrier()
record = {
    "rank": rank,
    "world_size": world,
    "local_rank": int(os.environ["LOCAL_RANK"]),
    "slurmd_nodename": os.environ.get("SLURMD_NODENAME"),
    "hostname": socket.gethostname(),
    "netns_inode": os.stat("/proc/self/ns/net").st_ino,
    "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
    "gloo_socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
    "nccl_socket_ifname": os.environ.get("NCCL_SOCKET_IFNAME"),
    "result": x.tolist(),
    "import_s": round(imported - start, 2),
    "collective_s": round(time.monotonic() - imported, 2),
}
dist.destroy_process_group()
out = os.path.join(os.environ["OUT_DIR"], f"rank{rank}.json")
with open(out + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(out + ".tmp", out)
print(json.dumps(record), flush=True)
