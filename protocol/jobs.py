"""What a node can train in a swarm: one expert per cluster ("expert/<k>") and the router ("router").

A `Job` is parsed once, from the command line, a claim record or a file, and then carried as a
value: `job.cluster`, `job.is_router`, `str(job)` for its one spelling on the wire and on screen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

from protocol.errors import InvalidRecord

MAX_CLUSTERS = 10_000  # clusters 0..9999: four digits on the wire
_SPELLING = re.compile(r"router|expert/(0|[1-9][0-9]{0,3})")  # one spelling per job: no leading zeros


class InvalidJob(InvalidRecord):
    """A job name is neither 'router' nor 'expert/<k>' with k in 0..9999 written without leading zeros."""


@dataclass(frozen=True)
class Job:
    """An expert job (`cluster` >= 0) or the router job (`cluster` is None)."""

    cluster: Optional[int] = None

    def __post_init__(self) -> None:
        if self.cluster is not None and (isinstance(self.cluster, bool) or not isinstance(self.cluster, int)
                                         or not 0 <= self.cluster < MAX_CLUSTERS):
            raise InvalidJob(f"an expert job's cluster must be an integer in [0, {MAX_CLUSTERS}), got "
                             f"{self.cluster!r:.40}")

    @classmethod
    def expert(cls, cluster: int) -> "Job":
        return cls(cluster)

    @classmethod
    def router(cls) -> "Job":
        return cls(None)

    @classmethod
    def parse(cls, text: object) -> "Job":
        """'router' or 'expert/<k>' -> a Job; `InvalidJob` for anything else."""
        if not isinstance(text, str) or not _SPELLING.fullmatch(text):
            raise InvalidJob(f"not a job: {str(text)[:40]!r} (expected 'router' or 'expert/<k>')")
        return cls.router() if text == "router" else cls.expert(int(text.split("/", 1)[1]))

    @property
    def is_router(self) -> bool:
        return self.cluster is None

    @property
    def slug(self) -> str:
        """A file-name-safe spelling: 'router', 'expert-3'."""
        return str(self).replace("/", "-")

    def to_wire(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return "router" if self.cluster is None else f"expert/{self.cluster}"

    def __repr__(self) -> str:
        return f"Job({str(self)!r})"


def swarm_jobs(num_clusters: int, include_router: bool = True) -> List[Job]:
    """Every job of a swarm of `num_clusters` clusters, experts first."""
    jobs = [Job.expert(k) for k in range(num_clusters)]
    return jobs + [Job.router()] if include_router else jobs
