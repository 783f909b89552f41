"""Which checkpoint records of a job to try, and in what order.

A record is only a promise about a blob. In an open swarm anyone may announce thousands of records
at any step, so before fetching anything: a record whose blob is larger than its model's checkpoint
can be is passed over (a garbage blob may not cost more than a real one); providers are looked up
for a batch of candidates in one DHT traversal, and a record whose blob nobody provides is passed
over without waiting. Callers give up on a job after `MAX_FAILURES` candidates failed (unreachable
or refused by the acceptance checks), so a flood costs a bounded number of downloads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Tuple, Union

import torch

from ddm_models.experts import build_expert
from ddm_models.router import build_router
from node.jobs import expert_config, router_config
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord, RouterRecord

logger = logging.getLogger("ddm_swarm.candidates")
Record = Union[CheckpointRecord, RouterRecord]
MAX_FAILURES = 8
LOOKUP_BATCH = 64
# A checkpoint holds at most four float32 copies of the model's tensors (EMA, training weights and
# two AdamW moments) and a small JSON header.
_COPIES, _HEADER_BYTES = 4, 1 << 20
_size_limits: Dict[Tuple[str, str], int] = {}


def size_limit(record: Record, manifest: SwarmManifest) -> int:
    """The largest blob (bytes) a checkpoint of `record`'s model can be."""
    key = (manifest.swarm_id, "router" if isinstance(record, RouterRecord) else record.model)
    if key not in _size_limits:
        with torch.device("meta"):  # shapes only: no memory for weights
            model = (build_router(router_config(manifest)) if isinstance(record, RouterRecord)
                     else build_expert(expert_config(manifest.expert_spec(record.model), manifest)))
        elements = sum(tensor.numel() for tensor in model.state_dict().values())
        _size_limits[key] = _COPIES * 4 * elements + _HEADER_BYTES
    return _size_limits[key]


@dataclass
class Passed:
    """Records passed over without a download, by reason."""

    unprovided: int = 0
    oversized: int = 0

    def __bool__(self) -> bool:
        return bool(self.unprovided or self.oversized)

    def describe(self) -> str:
        return (f"{self.unprovided} whose blob nobody provides, {self.oversized} whose blob is larger than "
                f"its model's checkpoint can be")


def obtainable(records: Iterable[Record], membership, store, manifest: SwarmManifest,
               passed: Passed | None = None) -> Iterator[Record]:
    """`records` (in the order given, best first) whose blob this node holds or someone provides,
    and whose size is plausible for its model. `passed` counts the others."""
    passed = passed if passed is not None else Passed()
    pending = list(records)
    for start in range(0, len(pending), LOOKUP_BATCH):
        batch = []
        for record in pending[start:start + LOOKUP_BATCH]:
            if record.blob.size > size_limit(record, manifest):
                passed.oversized += 1
            else:
                batch.append(record)
        unknown = [record.blob.sha256 for record in batch if not store.has(record.blob.sha256)]
        provided = membership.providers_of(unknown) if unknown else {}
        for record in batch:
            if store.has(record.blob.sha256) or record.blob.sha256 in provided:
                yield record
            else:
                passed.unprovided += 1
