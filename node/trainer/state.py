"""What a node is told (`NodeOptions`), where it is in its life (`NodeState`), what it shows while it
runs (`NodeStatus`), what one run trained (`TrainingSummary`, the command's last line for scripts
and benchmarks), and the job its data dir trains (`JobFile`, so a restart continues it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

from node.checkpoints.published import UnreadableNodeFile
from node.files import atomic_write_bytes
from node.swarm.reachability import NetworkOptions
from protocol.jobs import InvalidJob, Job

if TYPE_CHECKING:
    from node.trainer.initialisation import InitSource


class NodeState(str, Enum):
    """Where a training node is in its life (Petals' ServerState, with a node's own steps). Every
    transition is shown in the live panel and announced in the node's presence record.

    JOINING -> CLAIMING -> RESUMING -> TRAINING, then MOVING (back to CLAIMING: another job has no
    trainer), SERVING (the budget is spent: job released, blobs still served) or HANDING_OVER (stopped:
    the last checkpoint is served until another peer holds it) -> LEAVING -> OFFLINE.
    """

    JOINING = "joining"
    CLAIMING = "claiming"
    RESUMING = "resuming"
    TRAINING = "training"
    MOVING = "moving"
    SERVING = "serving"
    HANDING_OVER = "handing-over"
    LEAVING = "leaving"
    OFFLINE = "offline"

    def __str__(self) -> str:
        return self.value


@dataclass
class NodeOptions:
    data_dir: Path
    initial_peers: List[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 0
    job: Optional[Job] = None  # force a job instead of choosing one
    model: Optional[str] = None  # expert model of the manifest, instead of the cluster's default
    max_steps: Optional[int] = None
    max_minutes: Optional[float] = None
    exit_when_done: bool = False  # else keep serving blobs after the budget is spent
    mirror: bool = True
    audit: bool = True  # with mirror: audit other signers' expert checkpoints (node.checkpoints.audits)
    threads: int = 1
    seed: int = 0
    device: str = "auto"  # CUDA when present, else the CPU (`ddm_models.devices.resolve_device`)
    slice_s: float = 2.0  # train this long between looks at the outside world
    network: NetworkOptions = field(default_factory=NetworkOptions)  # how this node is reached
    init_from: Optional["InitSource"] = None  # a pretrained start for a job with nothing to resume (checked)


@dataclass
class NodeStatus:
    state: NodeState = NodeState.JOINING
    job: str = "-"
    model: str = "-"
    step: int = 0
    loss: float = float("nan")
    images_per_s: float = 0.0
    peers: int = 0
    last_checkpoint: str = "-"
    last_announcement: str = "-"
    resumed_from: str = "-"


@dataclass
class TrainingSummary:
    """What one `run` trained, wall clock over the whole training phase (checkpoints included)."""

    job: Job
    steps: int
    images: int
    seconds: float  # from the first step to the end of the last checkpoint
    checkpoints: int
    checkpoint_seconds: float  # of `seconds`, spent in `checkpoint()` on the training thread
    checkpoint_work_seconds: float = 0.0  # evaluating, writing and announcing them (mostly on their own thread)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"job": str(self.job), "steps": self.steps, "images": self.images, "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_s, 3), "checkpoints": self.checkpoints,
                "checkpoint_seconds": round(self.checkpoint_seconds, 3),
                "checkpoint_work_seconds": round(self.checkpoint_work_seconds, 3)}


@dataclass(frozen=True)
class JobFile:
    """node.json in a data dir: the job (and model) this data dir trains, written atomically when
    the node claims it, read when it restarts."""

    path: Path

    def write(self, job: Job, model: str) -> None:
        atomic_write_bytes(self.path, json.dumps({"job": str(job), "model": model}).encode())

    def read(self, jobs: List[Job], swarm: str) -> Optional[Job]:
        """The job trained before (None on a first start); `UnreadableNodeFile` if the file is corrupt
        or names a job the swarm does not have."""
        if not self.path.exists():
            return None
        try:
            job = Job.parse(json.loads(self.path.read_text())["job"])
        except (OSError, ValueError, KeyError, TypeError, InvalidJob) as error:
            raise UnreadableNodeFile(f"{self.path} is corrupt ({type(error).__name__}: {error}); delete it "
                                     "(or pass --job) and restart: the node then claims a job afresh") from None
        if job not in jobs:
            raise UnreadableNodeFile(f"{self.path} names job {job}, which swarm '{swarm}' does not have "
                                     f"({', '.join(map(str, jobs))}); delete it or pass --job")
        return job
