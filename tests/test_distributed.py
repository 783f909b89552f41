"""Data-parallel training as torchrun launches it: two CPU processes (gloo) on 127.0.0.1.

On a multi-GPU node the same code path runs with NCCL, one process per GPU (`torchrun
--nproc_per_node=N ...`); that cannot run on this CPU-only machine."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_training_keeps_replicas_identical_and_counts_both_ranks_samples(tmp_path):
    world, steps, port = 2, 3, _free_port()
    processes = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, "-m", "tests.distributed_worker", str(tmp_path), str(steps)],
                                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for process in processes:
        output = process.communicate(timeout=120)[0].decode()
        assert process.returncode == 0, output[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == world for r in ranks)
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank drew its own batches
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name  # gradients were averaged
    assert all(r["samples_seen"] == steps * 32 * world for r in ranks)
    assert [r["wrote_state"] for r in ranks] == [True, False]  # only rank 0 writes files
