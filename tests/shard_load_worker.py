"""One process of tests/test_sharded.py's sharded-load test: joins a localhost jax.distributed run with one CPU
device, reads a GGUF straight into its shards on a mesh of every process' device (read_gguf's ``mesh``), and
prints JSON: its peak RSS before and after the read and the bytes of the shards it holds. Peak RSS is VmHWM of
/proc/self/status: getrusage's ru_maxrss keeps the parent's peak across exec (a test process that just wrote the
file reads > 1 GB there).

    python -m tests.shard_load_worker MODEL.gguf MESH COORDINATOR NUM_PROCESSES PROCESS_ID
"""

from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024  # kB


def main(path: str, mesh: str, coordinator: str, num_processes: int, process_id: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 1)
    jax.distributed.initialize(coordinator, num_processes, process_id)
    from mtp_jax import sharding
    from mtp_jax.io.gguf import read_gguf

    before = peak_rss()
    _, params = read_gguf(path, mesh=lambda cfg: sharding.make_mesh(**sharding.parse_mesh(mesh, jax.device_count(),
                                                                                            cfg)))
    held = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
    print(json.dumps({"process": process_id, "peak_rss_before": before, "peak_rss": peak_rss(), "held": held}),
          flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
