"""Handing the last checkpoint over before leaving.

A node that stops writes a final checkpoint and announces it; if it left at once, that checkpoint
could live in the DHT as the job's best while nobody could serve its blob (mirrors copy a job's best
only every lease period), so the next trainer of the job would lose those steps. A leaving node
therefore serves on until another peer provides the blob (a mirror copied it): for a bounded time,
and only while another trainer is online to copy it. Mirrors copy only a job's best checkpoint, so
the wait runs out when another trainer's checkpoint of the job is better (nothing is lost then).

A provider record is only a claim, and anyone can sign one naming any peer id: the hand-over ends
only once a named peer *answers* over the blob protocol that it holds the blob (`holds`), so one
fake provider record cannot send the last copy of a checkpoint away with its leaving node.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable

from node.swarm.membership import SwarmMembership
from protocol.hashing import BlobRef
from protocol.records import SERVING_STATES

logger = logging.getLogger("ddm_swarm.handover")
POLL_S = 1.0
PROBES_PER_POLL = 4
# the wait is 4 lease periods (a mirror looks once a period), within these bounds (seconds)
MIN_WAIT_S, MAX_WAIT_S = 30.0, 60.0


def handover_wait_s(lease_s: float) -> float:
    return min(max(4 * lease_s, MIN_WAIT_S), MAX_WAIT_S)


def needs_hand_over(membership: SwarmMembership) -> bool:
    """Whether another trainer of the swarm is online (trainers mirror other jobs' best checkpoints).
    Whether our checkpoint is its job's best is not asked: any peer can announce a record of a higher
    step (a liar would then keep every honest node from handing over)."""
    return any(p.peer_id != membership.peer_id and p.role == "trainer" and p.state in SERVING_STATES
               for p in membership.peers())


def hand_over(membership: SwarmMembership, blob: BlobRef, timeout_s: float, leave_now: threading.Event,
              holds: Callable[[str, str], bool]) -> bool:
    """Wait until a peer other than this one provides `blob` and confirms it (`holds(peer_id,
    sha256)`, the blob protocol's probe), at most `timeout_s` seconds or until `leave_now` is set.
    True if someone else holds it."""
    sha256 = blob.sha256
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            named = sorted({p.peer_id for p in membership.providers(blob)} - {membership.peer_id})
            # a sample each poll: a flood of fake records costs a few probes a poll, never the hand-over
            if any(holds(peer_id, sha256) for peer_id in random.sample(named, min(len(named), PROBES_PER_POLL))):
                return True
        except Exception as error:  # the swarm is unreachable: nobody to hand over to
            logger.info(f"hand-over of {sha256[:12]} stopped: {error}")
            return False
        if leave_now.wait(POLL_S) or time.monotonic() >= deadline:
            return False


def hand_over_checkpoint(membership: SwarmMembership, record, lease_s: float, leave_now: threading.Event,
                         holds) -> bool:
    """Serve `record`'s blob until another peer holds it (`hand_over`, at most `handover_wait_s`),
    saying what happens; True if someone else holds it."""
    wait_s = handover_wait_s(lease_s)
    logger.info(f"handing checkpoint step {record.step} over to the swarm before leaving (at most {wait_s:.0f} s; "
                "Ctrl-C again to leave now)")
    if hand_over(membership, record.blob, wait_s, leave_now, holds):
        logger.info(f"another peer holds checkpoint step {record.step} now: leaving")
        return True
    logger.warning(f"leaving while no other peer holds checkpoint step {record.step} yet: it is back when this "
                   "node is")
    return False
