"""One rank of a torchrun-style launch (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment):
trains a tiny image-only router for a few steps and writes what it ended with to OUT/rank<r>.pt.
Run by tests/test_distributed.py; usage: python -m tests.distributed_worker OUT STEPS."""

import os
import sys
from pathlib import Path

import torch

from ddm_models.clustering import cluster_images
from ddm_models.router_training import RouterTrainer
from tests.ml_fixtures import small_digits, tiny_router_config


def main(out: Path, steps: int) -> None:
    torch.set_num_threads(1)
    data = small_digits()
    clusters = torch.from_numpy(cluster_images(data.images, 4, seed=0, fine=16).assignments.copy())
    trainer = RouterTrainer(tiny_router_config(use_text=False), data, clusters, seed=0, batch_size=32,
                            warmup_steps=2)
    stats = trainer.train_steps(steps)
    written = trainer.save_state(out / "state")
    torch.save({"rank": trainer.rank, "world_size": trainer.world_size, "losses": stats.losses,
                "samples_seen": trainer.samples_seen, "wrote_state": written is not None,
                "weights": trainer.model.state_dict()}, out / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
