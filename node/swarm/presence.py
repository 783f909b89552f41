"""A peer's lifecycle in the DHT: JOINING -> ONLINE -> OFFLINE, as signed `PeerRecord`s.

The OFFLINE record is a tombstone: it replaces the ONLINE one at once instead of letting it linger
until it expires, so `status` shows who left cleanly.
"""

from __future__ import annotations

import logging
from typing import Optional, Union

from hivemind.utils.timed_storage import get_dht_time

from node.swarm.membership import SwarmMembership
from protocol.jobs import Job
from protocol.records import PeerRecord

logger = logging.getLogger("ddm_swarm.presence")
SOFTWARE = "ddm-swarm/0.1.0"


class Presence:
    def __init__(self, membership: SwarmMembership, role: str, job: Optional[Job] = None):
        self.membership, self.role, self.job = membership, role, job
        self.state = "joining"
        self._last_expiry = 0.0

    def announce(self, state: Optional[str] = None, job: Union[Job, None, str] = "same") -> None:
        """(Re)publish this peer's record; call at least every lease period while running. `job`: the
        job it trains now (None: none); left out, the one announced last."""
        self.state = state or self.state
        self.job = self.job if job == "same" else job
        # hivemind keeps, per subkey, the entry with the latest expiration: never go backwards
        expires = max(get_dht_time() + 3 * self.membership.manifest.timing.lease_s, self._last_expiry + 1e-3)
        record = PeerRecord(self.membership.swarm_id, self.membership.peer_id, tuple(self.membership.maddrs[:8]),
                            self.role, self.job, self.state, SOFTWARE, expires)
        self.membership.publish(record.signed_by(self.membership.identity), confirm=False)
        self._last_expiry = expires

    def leave(self) -> None:
        try:
            self.announce("offline")
        except Exception as error:  # leaving must not fail because the swarm is already gone
            logger.warning(f"could not announce OFFLINE: {error}")
