"""Handing the last checkpoint over before leaving.

A node that stops writes a final checkpoint and announces it; if it left at once, that checkpoint
could live in the DHT as the job's best while nobody could serve its blob (mirrors copy a job's best
only every lease period), so the next trainer of the job would lose those steps. A leaving node
therefore serves on until another peer provides the blob (a mirror copied it): for a bounded time,
only while another trainer is online to copy it, and only if it is the job's best (mirrors copy
only that one; a better checkpoint of another trainer carries the job on).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Union

from node.membership import SwarmMembership
from protocol.records import CheckpointRecord, RouterRecord

logger = logging.getLogger("ddm_swarm.handover")
POLL_S = 1.0
# the wait is 4 lease periods (a mirror looks once a period), within these bounds (seconds)
MIN_WAIT_S, MAX_WAIT_S = 30.0, 60.0


def handover_wait_s(lease_s: float) -> float:
    return min(max(4 * lease_s, MIN_WAIT_S), MAX_WAIT_S)


def needs_hand_over(membership: SwarmMembership, record: Union[CheckpointRecord, RouterRecord]) -> bool:
    """Whether `record` is its job's best checkpoint and another trainer of the swarm is online
    (trainers mirror other jobs' best checkpoints)."""
    records = membership.routers() if isinstance(record, RouterRecord) else membership.checkpoints(record.cluster)
    if any(r.step > record.step for r in records if r.signer != record.signer):
        return False
    return any(p.peer_id != membership.peer_id and p.role == "trainer" and p.state == "online"
               for p in membership.peers())


def hand_over(membership: SwarmMembership, sha256: str, timeout_s: float, leave_now: threading.Event) -> bool:
    """Wait until a peer other than this one provides blob `sha256`, at most `timeout_s` seconds or
    until `leave_now` is set. True if someone else holds it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if any(p.peer_id != membership.peer_id for p in membership.providers(sha256)):
                return True
        except Exception as error:  # the swarm is unreachable: nobody to hand over to
            logger.info(f"hand-over of {sha256[:12]} stopped: {error}")
            return False
        if leave_now.wait(POLL_S) or time.monotonic() >= deadline:
            return False
