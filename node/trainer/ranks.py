"""Several training processes behind one node (`ddm-swarm node --gpus N`, or under `torchrun`).

Rank 0 is the node: it alone joins the DHT, claims, announces, mirrors, serves blobs and writes
checkpoints (`SwarmNode`). Ranks 1..N-1 only train, in lockstep with it, the one job rank 0 claimed,
through DDP (`ddm_models.training`): gradients are averaged, so every replica holds the same weights.
The followers decide nothing; every decision is rank 0's and reaches them as a command, a small
int64 tensor broadcast from rank 0 (`[command, argument]`):

    JOB     then (job, model) as a broadcast object: build that job's trainer, on the data rank 0
            prepared in the data dir's cache (DDP's constructor is a collective: rank 0 builds its
            trainer at the same moment)
    STATE   rank 0 resumed: take its weights, EMA, AdamW moments and step (`share_state_from_rank0`)
    TRAIN n take exactly n steps. A slice of wall time would give each rank its own step count and
            the gradient all-reduce would wait forever, so rank 0 turns its slice into a step count
            from the speed it measured. After the steps every rank all-reduces a stop flag: a
            follower sent SIGTERM stops the whole node at the end of that slice.
    STOP    leave (sent when training is over, and in rank 0's teardown)

A rank that dies closes its sockets: the collective the others are in (a command, a gradient
all-reduce) raises, at the latest after `RANK_TIMEOUT`. Rank 0 then raises `RankLost` through its
normal teardown (the lease is given back, OFFLINE published); the followers exit. Ctrl-C reaches
every process of the terminal: followers ignore SIGINT and leave on rank 0's STOP. All ranks run
on one machine (they share the data dir's cache).
"""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from ddm_models.devices import resolve_device
from node.errors import NodeError

logger = logging.getLogger("ddm_swarm.ranks")

# A follower waits for rank 0's next command while rank 0 claims a job (up to a lease period or
# more), resumes, or writes a large checkpoint: minutes, not seconds. A rank that dies is noticed
# at once (its sockets close); the timeout only bounds a rank that hangs.
RANK_TIMEOUT = timedelta(minutes=30)
JOB, STATE, TRAIN, STOP = 1, 2, 3, 4


class RankLost(NodeError):
    """Another training process of this node stopped or crashed; the node stops."""


class MultiRankSetupError(NodeError):
    """--gpus asks for something this machine cannot give (more GPUs than it has, a bad launch)."""


def torchrun_world() -> Optional[tuple[int, int, int]]:
    """(rank, local rank, world size) when torchrun (or `spawn_followers`) launched this process
    with WORLD_SIZE > 1, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), world


def rank_device(device: str, local_rank: int) -> str:
    """The device of one rank: the CPU stays the CPU (gloo); CUDA is one GPU per local rank (NCCL)."""
    resolved = resolve_device(device)
    if resolved.type == "cpu":
        return "cpu"
    if local_rank >= torch.cuda.device_count():
        raise MultiRankSetupError(f"rank {local_rank} needs GPU cuda:{local_rank}, this machine has "
                                  f"{torch.cuda.device_count()}; use --gpus {torch.cuda.device_count()} at most")
    return f"cuda:{local_rank}"


def _join_group(device: str) -> torch.device:
    """Join the process group of this rank (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); the
    device the command tensors live on (NCCL moves only CUDA tensors)."""
    target = torch.device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo", timeout=RANK_TIMEOUT)
    return target if target.type == "cuda" else torch.device("cpu")


class SingleRank:
    """A node of one process: nothing to tell anyone."""

    world_size = 1

    def start_job(self, job, model: str) -> None:
        pass

    def share_state(self, trainer) -> None:
        pass

    def train_for(self, trainer, seconds: float, max_steps: Optional[int] = None):
        return trainer.train_for(seconds, max_steps=max_steps)

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class RankGroup:
    """Rank 0's side: sends the commands, trains its own share, notices a lost or stopping rank.

    `on_stop` is called when a follower asked to stop (rank 0 then stops as if told itself)."""

    def __init__(self, device: str, followers: Optional[List[subprocess.Popen]] = None):
        self.command_device = _join_group(device)
        self.world_size = dist.get_world_size()
        self.followers = followers or []  # the processes `spawn_followers` started (none under torchrun)
        self.on_stop: Callable[[], None] = lambda: None
        self._seconds_per_step: Optional[float] = None
        self._released = False

    def _send(self, command: int, argument: int = 0) -> None:
        try:
            dist.broadcast(torch.tensor([command, argument], dtype=torch.int64, device=self.command_device), src=0)
        except (RuntimeError, dist.DistError) as error:
            raise self._lost(error) from None

    def _lost(self, error: Exception) -> RankLost:
        exited = [f"rank {i + 1} exited with {p.returncode}" for i, p in enumerate(self.followers)
                  if p.poll() is not None]
        return RankLost(f"a training process of this node is gone ({'; '.join(exited) or str(error)[:200]}): the "
                        "node stops; restart it (it resumes from its last checkpoint)")

    def start_job(self, job, model: str) -> None:
        """Tell the followers to build the trainer of `job` (call before building rank 0's)."""
        self._send(JOB)
        try:
            dist.broadcast_object_list([(str(job), model)], src=0)
        except (RuntimeError, dist.DistError) as error:
            raise self._lost(error) from None

    def share_state(self, trainer) -> None:
        """Rank 0's trainer has resumed: the followers take its state."""
        self._send(STATE)
        try:
            trainer.share_state_from_rank0()
        except (RuntimeError, dist.DistError) as error:
            raise self._lost(error) from None

    def train_for(self, trainer, seconds: float, max_steps: Optional[int] = None):
        """About `seconds` of training (at most `max_steps` steps), the same steps on every rank."""
        steps = 1 if self._seconds_per_step is None else max(1, int(seconds / self._seconds_per_step))
        if max_steps is not None:
            steps = max(0, min(steps, max_steps))
        self._send(TRAIN, steps)
        try:
            stats = trainer.train_steps(steps)
            stopping = _any_rank_stopping(False, self.command_device)
        except (RuntimeError, dist.DistError) as error:
            raise self._lost(error) from None
        if steps:
            self._seconds_per_step = stats.seconds / steps
        if stopping:
            logger.info("another training process of this node was told to stop: stopping")
            self.on_stop()
        return stats

    def release(self, grace_s: float = 30.0) -> None:
        """Training is over: the followers leave (once; a lost rank is only logged here), and the
        processes this node started are waited for (ended after `grace_s`: `end_stuck_follower`)."""
        if self._released:
            return
        self._released = True
        try:
            self._send(STOP)
        except RankLost as error:
            logger.info(f"could not tell the other ranks to stop: {error}")
        deadline = time.monotonic() + grace_s
        for process in self.followers:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                end_stuck_follower(process, grace_s)

    def close(self) -> None:
        """Release the followers (if training did not already) and leave the process group."""
        self.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def end_stuck_follower(process: subprocess.Popen, grace_s: float) -> None:
    """A follower told to leave is still there: its stacks go to the log (SIGUSR1, see `main`), then it
    is terminated, and killed if that does not end it. Never raises: this runs in the node's teardown."""
    logger.warning(f"training process {process.pid} did not leave within {grace_s:.0f} s of being told to: "
                   "its stacks follow, then it is terminated")
    for end, wait_s in ((lambda: process.send_signal(signal.SIGUSR1), 2), (process.terminate, 10), (process.kill, 10)):
        try:
            end()
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
        except OSError:  # it left in the meantime
            return
    logger.error(f"training process {process.pid} survived SIGKILL for 10 s; leaving it behind")


def _any_rank_stopping(stopping: bool, device: torch.device) -> bool:
    flag = torch.tensor([int(stopping)], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn_followers(manifest, options, world_size: int) -> RankGroup:
    """Start ranks 1..world_size-1 as processes of this machine (`python -m node.trainer.ranks`)
    and make this process rank 0 of their group."""
    if resolve_device(options.device).type == "cuda" and world_size > torch.cuda.device_count():
        raise MultiRankSetupError(f"--gpus {world_size} asked for, this machine has {torch.cuda.device_count()} "
                                  "CUDA GPU(s)")
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world_size)}
    if sys.platform.startswith("linux"):
        common.setdefault("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    os.environ.update(common, RANK="0", LOCAL_RANK="0")  # the trainer reads WORLD_SIZE to wrap DDP
    followers = []
    for rank in range(1, world_size):
        env = {**os.environ, **common, "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": str(options.threads)}
        process = subprocess.Popen([sys.executable, "-m", "node.trainer.ranks"], stdin=subprocess.PIPE, env=env)
        process.stdin.write(pickle.dumps((manifest, options)))  # our own objects, to our own child
        process.stdin.close()
        followers.append(process)
    return RankGroup(rank_device(options.device, 0), followers)


def start_ranks(manifest, options, gpus: int):
    """The ranks of a node started with `--gpus gpus`: `SingleRank` for one process; under torchrun,
    rank 0's `RankGroup` (or, on the other ranks, None once they have followed rank 0 to the end);
    else rank 0's group of followers spawned here. Set `options.device` to rank 0's device."""
    launched = torchrun_world()
    if launched is not None:
        rank, local_rank, _ = launched
        if rank != 0:
            follow(manifest, options)
            return None
        options.device = rank_device(options.device, local_rank)
        return RankGroup(options.device)
    if gpus <= 1:
        return SingleRank()
    group = spawn_followers(manifest, options, gpus)
    options.device = rank_device(options.device, 0)
    return group


def follow(manifest, options) -> None:
    """A follower rank's whole life: join the group, obey rank 0's commands until STOP."""
    from node.blobs.store import BlobStore
    from node.data.swarm_data import job_data
    from node.trainer.building import build_trainer
    from protocol.jobs import Job

    rank, local_rank, _ = torchrun_world()
    options = dataclasses.replace(options, device=rank_device(options.device, local_rank))
    torch.set_num_threads(options.threads)
    stopping = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: rank 0 got it too and decides
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    command_device = _join_group(options.device)
    # the trainer a job gets is decided in one place (node.trainer.building); a follower never joins
    trainer = None
    while True:
        command = torch.zeros(2, dtype=torch.int64, device=command_device)
        dist.broadcast(command, src=0)
        what, argument = command.tolist()
        if what == JOB:
            described = [None]
            dist.broadcast_object_list(described, src=0)
            job, model = Job.parse(described[0][0]), described[0][1]
            store = BlobStore(options.data_dir / "blobs")  # rank 0 fetched the job's shards and filled the cache
            data = job_data(manifest, options.data_dir / "cache", fetch=lambda ref: store.path(ref.sha256))
            trainer = build_trainer(manifest, job, model, data, seed=options.seed, device=options.device)
            logger.info(f"rank {rank}: training {job} ({model}) with rank 0")
        elif what == STATE:
            trainer.share_state_from_rank0()
        elif what == TRAIN:
            trainer.train_steps(argument)
            _any_rank_stopping(stopping.is_set(), command_device)
        elif what == STOP:
            break
    # Training is over: SIGTERM ends the process from here on (a Python handler would not run while a
    # teardown blocked in native code; rank 0 terminates a follower that does not leave).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logger.info(f"rank {rank}: leaving")
    dist.destroy_process_group()


def main() -> None:
    """Entry of a follower started by `spawn_followers`: (manifest, options) pickled on stdin."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # rank 0 asks a follower that hangs where it is
    manifest, options = pickle.loads(sys.stdin.buffer.read())
    try:
        follow(manifest, options)
    except (RuntimeError, dist.DistError) as error:  # rank 0 is gone: nothing to train for
        logger.error(f"rank {os.environ.get('RANK')}: lost rank 0 ({str(error)[:200]}); leaving")
        sys.exit(1)


if __name__ == "__main__":
    main()
