"""The swarm's record validator, installed on every hivemind peer of the swarm.

hivemind calls `validate()` inside its DHT process when another peer asks it to store a record and
when another peer returns a record it asked for; a `False` drops the record. hivemind hands over
the *hash* of the key (a DHTID), not its name, so the validator derives the key a record must live
under from the record's own content and compares hashes. Every refusal is logged with its reason
and counted; nothing raised here may escape into hivemind.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import lru_cache

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from protocol.errors import InvalidRecord, ProtocolError
from node.swarm.storage_caps import cap_keys
from protocol.keys import checkpoint_key, parse_key, router_key
from protocol.limits import MAX_SUBKEYS_PER_KEY
from protocol.manifest import SwarmManifest
from protocol.policy import RecordPolicy, key_for_record
from protocol.record_cache import RecordCache

logger = logging.getLogger("ddm_swarm.validator")


@lru_cache(maxsize=65536)
def dht_key_id(key: str) -> bytes:
    return DHTID.generate(source=key).to_bytes()


class SwarmRecordValidator(RecordValidatorBase):
    """Schema, ed25519 signature, expiration cap and size cap for every DHT entry of one swarm."""

    def __init__(self, manifest: SwarmManifest):
        self.manifest = manifest
        # checkpoint and router keys hold at most MAX_SUBKEYS_PER_KEY entries here (see storage_caps)
        cap_keys([dht_key_id(checkpoint_key(manifest.swarm_id, k)) for k in range(manifest.num_clusters)]
                 + [dht_key_id(router_key(manifest.swarm_id))], MAX_SUBKEYS_PER_KEY)
        self.policy = RecordPolicy(manifest)
        self.records = RecordCache()  # hivemind validates every entry of every answer: verify each once
        self.refused: Counter = Counter()
        self.accepted = 0

    def check(self, record: DHTRecord) -> None:
        """Raise a `ProtocolError` naming what is wrong with `record`, or return if it is acceptable."""
        subkey = MSGPackSerializer.loads(record.subkey)
        value = MSGPackSerializer.loads(record.value)
        if not isinstance(subkey, str):
            raise InvalidRecord("swarm records must be stored under a signer subkey")
        if not isinstance(value, bytes):
            raise InvalidRecord(f"swarm record values must be bytes, got {type(value).__name__}")
        decoded = self.records.decode(value)
        key = key_for_record(decoded)
        if dht_key_id(key) != record.key:
            raise InvalidRecord(f"{decoded.KIND} record stored under a key other than {key[:80]}")
        self.policy.check(parse_key(key), subkey, decoded, record.expiration_time, get_dht_time())

    def validate(self, record: DHTRecord) -> bool:
        try:
            self.check(record)
        except ProtocolError as error:
            self._refuse(type(error).__name__, error)
            return False
        except Exception as error:  # hostile bytes may break the deserializer in any way; never crash
            self._refuse("Malformed", error)
            return False
        self.accepted += 1
        return True

    def _refuse(self, reason: str, error: Exception) -> None:
        self.refused[reason] += 1
        count = self.refused[reason]
        if count <= 10 or count % 1000 == 0:  # keep logs readable under a flood
            logger.warning(f"refused a DHT record ({reason}, {count} so far): {str(error)[:200]}")

    def stats(self) -> dict:
        return {"accepted": self.accepted, "refused": dict(self.refused)}
