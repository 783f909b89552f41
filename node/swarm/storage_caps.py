"""A bound on the entries one DHT key of the swarm holds on this peer, applied where hivemind stores
them (its DHT process's local storage), so that a Sybil flood cannot hide a key.

Why: hivemind answers a read with the whole dictionary of a key; past its ~4 MiB message limit the
answer fails and a reader sees *no* entry, the honest ones included (~9,000 flooded checkpoint
records did it). With at most MAX_SUBKEYS_PER_KEY live entries per checkpoint/router key on every
honest storing peer, an answer stays far below the limit (512 entries of at most 4 KiB: 2 MiB, real
records are ~600 B). Preference: what is stored stays. A signer already holding an entry may always
renew it; a new signer is refused while the key is full, so a flood can neither evict nor hide the
trainers that were there before it. What it can still do is keep *new* signers off a full key until
its entries expire (see SECURITY.md).

Only checkpoint and router keys of this node's swarm are capped (their DHT ids are registered by
`SwarmRecordValidator`); hivemind hands storage the key's hash, not its name. The patch is installed
in the parent process before hivemind forks its DHT process, which inherits it.
"""

from __future__ import annotations

import logging
import threading
from typing import Dict, Iterable

from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue

logger = logging.getLogger("ddm_swarm.storage_caps")
_caps: Dict[bytes, int] = {}  # DHT key id -> most live subkeys it may hold
_lock = threading.Lock()
refused = 0
_original_store_subkey = DHTLocalStorage.store_subkey


def cap_keys(key_ids: Iterable[bytes], cap: int) -> None:
    """Hold each key of `key_ids` (DHTID bytes) to at most `cap` live subkeys on this peer."""
    with _lock:
        for key_id in key_ids:
            _caps[key_id] = cap
        if DHTLocalStorage.store_subkey is _original_store_subkey:
            DHTLocalStorage.store_subkey = _capped_store_subkey


def _capped_store_subkey(self, key, subkey, value, expiration_time) -> bool:
    global refused
    cap = _caps.get(key.to_bytes())
    if cap is not None:
        current = self.get(key)
        entries = current.value if current is not None else None
        if isinstance(entries, DictionaryDHTValue) and subkey not in entries and len(entries) >= cap:
            refused += 1
            if refused <= 10 or refused % 1000 == 0:
                logger.warning(f"refused a new entry under a full key ({cap} live entries; {refused} so far)")
            return False
    return _original_store_subkey(self, key, subkey, value, expiration_time)
