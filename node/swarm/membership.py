"""A peer's membership in a swarm: a hivemind DHT with the swarm's validator installed.

hivemind runs the DHT in a child process; `SwarmMembership` is the handle the node uses to publish
signed records and read them back, typed and checked again here (defence in depth: a record this
peer holds locally was validated when stored, but its expiration may have passed since).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from functools import partial
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Type, TypeVar, Union

from hivemind.dht import DHT
from hivemind.p2p import P2PDaemonError
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.timed_storage import get_dht_time

from node.swarm.reachability import NetworkOptions, extra_p2pd_flags, p2p_options
from node.swarm.validator import SwarmRecordValidator
from node.errors import InvalidPeerAddress, JoinFailed, PublishFailed
from protocol import keys
from protocol.errors import ProtocolError
from protocol.hashing import BlobRef
from protocol.identity import Identity
from protocol.jobs import Job
from protocol.limits import MAX_EXPIRATION_AHEAD_S
from protocol.manifest import SwarmManifest
from protocol.policy import RecordPolicy, describe_beacon, key_for_record
from protocol.record_cache import RecordCache
from protocol.records import (AuditRecord, CheckpointRecord, Claim, PeerRecord, ProviderRecord, Revocation,
                              RouterRecord, SignedRecord,
                              SwarmBeacon)

logger = logging.getLogger("ddm_swarm.membership")
R = TypeVar("R", bound=SignedRecord)
N = TypeVar("N", str, BlobRef)  # what a family of keys is named by
# A DHT call that takes longer means the DHT process is gone or wedged; fail instead of hanging.
DHT_CALL_TIMEOUT_S = 60.0
# keys per DHT traversal: one read of many keys is one pipe message (~140 pickled bytes a key) and
# one search; batches keep both bounded
GET_MANY_BATCH = 64


def check_initial_peers(initial_peers: Iterable[str]) -> List[str]:
    """Each initial peer must be a full multiaddr ending in /p2p/<peer id>."""
    checked = []
    for address in initial_peers:
        try:
            maddr = Multiaddr(address)
            maddr.value_for_protocol("p2p")
        except Exception:
            raise InvalidPeerAddress(f"initial peer {address!r} is not a multiaddr like "
                                     "/ip4/1.2.3.4/tcp/31337/p2p/12D3KooW… (copy it from the bootstrap's output)") from None
        checked.append(str(maddr))
    return checked


class _WholeMessages:
    """The DHT process's end of hivemind's command pipe, read whole messages at a time.

    hivemind's DHT process waits on that pipe with uvloop's `add_reader`, which leaves the pipe
    non-blocking; a message longer than one pipe write (a store of a large value, a read of many keys)
    can then be caught half-arrived: `recv` raises BlockingIOError, and the rest of that message is
    read as the next one, which kills the process (hivemind PR #660; open upstream). The reader is
    woken only once a message has begun to arrive, so a blocking read waits just for its rest."""

    def __init__(self, connection):
        self._connection = connection

    def recv(self):
        os.set_blocking(self._connection.fileno(), True)
        return self._connection.recv()

    def __getattr__(self, name: str):
        return getattr(self._connection, name)


class WholeMessageDHT(DHT):
    """hivemind's DHT, whose process reads each command from its pipe whole (see `_WholeMessages`)."""

    def run(self) -> None:
        self._inner_pipe = _WholeMessages(self._inner_pipe)  # in the DHT process only: run() runs there
        super().run()


class _NodeDHT(WholeMessageDHT):
    """hivemind's DHT process, detached from the terminal's process group: Ctrl-C and a group-wide
    SIGTERM reach only the node, which then shuts the DHT (and its p2pd) down in order, after
    releasing its claim. If the node dies instead, `_end_with_parent` ends this process and p2pd."""

    def __init__(self, *args, p2pd_flags: Optional[dict] = None, **kwargs):
        self._node_pid = os.getpid()  # before DHT.__init__, which forks the DHT process when start=True
        self._p2pd_flags = dict(p2pd_flags or {})
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # watch from the first moment: the node may be killed while this process is still starting
        threading.Thread(target=_end_with_parent, args=(self._node_pid,), name="end-with-node", daemon=True).start()
        with extra_p2pd_flags(self._p2pd_flags):  # this process starts p2pd
            super().run()


# A killed node's DHT process and p2pd end within ~2 s (see _end_with_parent); a loaded machine may take longer.
IDENTITY_RELEASE_S = 20.0


async def _routing_peer_ids(_dht, node) -> List[str]:
    return [str(peer_id) for peer_id in node.protocol.routing_table.peer_id_to_uid]


class SwarmMembership:
    """Joins the swarm's DHT and publishes/reads its signed records."""

    def __init__(self, manifest: SwarmManifest, identity: Identity, *, initial_peers: Sequence[str] = (),
                 host: str = "127.0.0.1", port: int = 0, p2p_identity_path: Optional[str] = None,
                 client_mode: bool = False, network: Optional[NetworkOptions] = None, reachable: bool = True):
        """`network` None: a short-lived client (status, generate): IPv4, hole punching, no relay
        service. Otherwise as `network` says for a peer found `reachable` (or not) at start."""
        self.manifest, self.identity = manifest, identity
        self.swarm_id = manifest.swarm_id
        self.policy = RecordPolicy(manifest)
        self.records = RecordCache()  # a key is read again and again; verify each record's signature once
        self.initial_peers = check_initial_peers(initial_peers)
        self._lock = threading.Lock()  # hivemind's DHT handle is driven through one pipe: one call at a time
        flags: dict = {}
        if network is None:
            # AutoNAT brings hole punching (DCUtR) along: a relayed connection to a provider behind
            # a NAT may be upgraded to a direct one (faster than the relay, and off its load)
            options: dict = dict(host_maddrs=[f"/ip4/{host}/tcp/{port}"], nat_port_map=False, auto_nat=True)
        else:
            options, flags = p2p_options(network, host, port, reachable=reachable)
            if not reachable and self.initial_peers:  # relays to reserve a slot on: the peers we join through
                options["trusted_relays"] = list(self.initial_peers)
        options.update(client_mode=client_mode, record_validators=[SwarmRecordValidator(manifest)])
        if p2p_identity_path:
            options["identity_path"] = p2p_identity_path
        self.dht = self._start_dht(options, flags, p2p_identity_path)
        self.peer_id = str(self.dht.peer_id)
        self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]

    def _start_dht(self, options: dict, flags: dict, p2p_identity_path: Optional[str]) -> "_NodeDHT":
        """Start the DHT process and p2pd. A node restarted right after a kill may find its previous
        daemon still answering for its peer id (it stops within seconds of its node's death, see
        `_end_with_parent`): that case is retried for IDENTITY_RELEASE_S before it is an error."""
        deadline = time.monotonic() + IDENTITY_RELEASE_S
        while True:
            try:
                return _NodeDHT(initial_peers=self.initial_peers or None, start=True, p2pd_flags=flags, **options)
            except P2PDaemonError as error:
                if self.initial_peers and "bootstrap" in str(error):
                    raise JoinFailed("none of the initial peers answered: " + ", ".join(self.initial_peers)
                                     + ". Check that at least one of them is running and reachable.") from None
                if "already taken" not in str(error):
                    raise JoinFailed(f"could not start the local p2p daemon: {error}") from None
                if time.monotonic() > deadline:
                    raise JoinFailed(f"another running peer uses this node's libp2p identity {p2p_identity_path}: "
                                     "is the same --data-dir in use by another node? Stop it, or give this node "
                                     "another --data-dir") from None
                logger.info("this node's peer id still answers elsewhere (a previous run stopping?); retrying")
                time.sleep(2.0)

    # --- writing ---------------------------------------------------------------------------------
    def publish(self, record: SignedRecord, *, confirm: bool = True, attempts: int = 5) -> None:
        """Store a signed record under its key; with `confirm`, read it back (store() may lie)."""
        key, value = key_for_record(record), record.encode()
        for attempt in range(attempts):
            if record.expires_at <= get_dht_time():  # type: ignore[attr-defined]
                raise PublishFailed(f"the {record.KIND} record expired before it could be published")
            with self._lock:
                self.dht.store(key, value, expiration_time=record.expires_at, subkey=record.signer,  # type: ignore
                               return_future=True).result(DHT_CALL_TIMEOUT_S)
            if not confirm or self._holds(key, record.signer, value):  # type: ignore[attr-defined]
                return
            time.sleep(0.2 * (attempt + 1))
        raise PublishFailed(f"could not confirm the {record.KIND} record under {key[:80]} in the DHT "
                            f"after {attempts} attempts; is this peer connected to the swarm?")

    def _holds(self, key: str, subkey: str, value: bytes) -> bool:
        found = self._get(key)
        return subkey in found and found[subkey][0] == value

    # --- reading ---------------------------------------------------------------------------------
    def _get(self, key: str) -> dict:
        with self._lock:
            result = self.dht.get(key, latest=True, return_future=True).result(DHT_CALL_TIMEOUT_S)
        if result is None or not isinstance(result.value, dict):
            return {}
        return {subkey: (item.value, item.expiration_time) for subkey, item in result.value.items()}

    def _get_many(self, keys: Sequence[str]) -> Dict[str, dict]:
        """Several keys in one DHT traversal per GET_MANY_BATCH keys: key -> {subkey: (value, expiration)}
        (absent if not found)."""
        keys, found = list(keys), {}
        for start in range(0, len(keys), GET_MANY_BATCH):
            with self._lock:
                found.update(self.dht.run_coroutine(partial(_get_many, keys[start:start + GET_MANY_BATCH]),
                                                    return_future=True).result(DHT_CALL_TIMEOUT_S))
        return found

    def _accept(self, key: str, entries: dict, kind: Type[R]) -> List[R]:
        records, now, parsed = [], get_dht_time(), keys.parse_key(key)
        for subkey, (value, expiration) in entries.items():
            try:
                record = self.records.decode(value, expected=kind)
                self.policy.check(parsed, subkey, record, expiration, now)
            except ProtocolError as error:
                logger.warning(f"dropped a {kind.KIND} entry under {key[:60]}: {error}")
                continue
            if record.expires_at >= now:  # type: ignore[attr-defined]
                records.append(record)
        return records

    def read(self, key: str, kind: Type[R]) -> List[R]:
        """Every acceptable record under `key`, of type `kind`; anything else is logged and dropped."""
        return self._accept(key, self._get(key), kind)

    def claims(self) -> List[Claim]:
        return self.read(keys.claims_key(self.swarm_id), Claim)

    def checkpoints(self, cluster: int) -> List[CheckpointRecord]:
        return self.read(keys.checkpoint_key(self.swarm_id, cluster), CheckpointRecord)

    def routers(self) -> List[RouterRecord]:
        return self.read(keys.router_key(self.swarm_id), RouterRecord)

    def job_checkpoints(self, job: Job) -> List[Union[CheckpointRecord, RouterRecord]]:
        """The live checkpoint records of `job`: the router's, or one cluster's experts'."""
        return self.routers() if job.is_router else self.checkpoints(job.cluster)

    def providers(self, blob: BlobRef) -> List[ProviderRecord]:
        """Provider records of exactly this reference (sha256, size and digest list)."""
        return self.read(keys.providers_key(self.swarm_id, blob), ProviderRecord)

    def providers_of(self, blobs: Sequence[BlobRef]) -> Dict[BlobRef, List[ProviderRecord]]:
        """Provider records of several blobs at once (one DHT traversal); blobs nobody provides are absent."""
        return self._read_many(keys.providers_key, blobs, ProviderRecord)

    def audits_of(self, blob_sha256s: Sequence[str]) -> Dict[str, List[AuditRecord]]:
        """Audit records of several checkpoint blobs at once; blobs nobody audited are absent."""
        return self._read_many(keys.audits_key, blob_sha256s, AuditRecord)

    def revocations_of(self, targets: Sequence[str]) -> List[Revocation]:
        """The operator's live revocations of any of `targets` (signer ids, blob sha256s)."""
        return [r for found in self._read_many(keys.revocation_key, targets, Revocation).values() for r in found]

    def _read_many(self, key_of: Callable[[str, N], str], names: Sequence[N], kind: Type[R]) -> Dict[N, List[R]]:
        wanted = {key_of(self.swarm_id, name): name for name in dict.fromkeys(names)}
        found = {}
        for key, entries in self._get_many(list(wanted)).items():
            records = self._accept(key, entries, kind)
            if records:
                found[wanted[key]] = records
        return found

    def peers(self) -> List[PeerRecord]:
        return self.read(keys.peers_key(self.swarm_id), PeerRecord)

    def contacted_peer_ids(self) -> List[str]:
        """Peer ids in this node's DHT routing table: peers that answered it (see node.swarm.peer_cache)."""
        with self._lock:
            return self.dht.run_coroutine(_routing_peer_ids)

    # --- the swarm's name beacon -----------------------------------------------------------------
    def announce_beacon(self) -> None:
        expires = get_dht_time() + MAX_EXPIRATION_AHEAD_S["beacon"] / 2
        beacon = SwarmBeacon(self.swarm_id, self.manifest.name, self.manifest.protocol_version, expires)
        self.publish(beacon.signed_by(self.identity), confirm=False)

    def beacon_problems(self) -> List[str]:
        """Messages about peers that use this swarm's name with another manifest or protocol version."""
        problems = set()
        for beacon in self.read(keys.beacon_key(self.manifest.name), SwarmBeacon):
            message = describe_beacon(beacon, self.manifest)
            if message:
                problems.add(message)
        return sorted(problems)

    # --- housekeeping ----------------------------------------------------------------------------
    def validator_stats(self) -> dict:
        """How many records this peer's DHT process accepted and refused, by reason."""
        with self._lock:
            return self.dht.run_coroutine(_validator_stats, return_future=True).result(DHT_CALL_TIMEOUT_S)

    def num_peers(self) -> int:
        with self._lock:
            return self.dht.run_coroutine(_routing_table_size, return_future=True).result(DHT_CALL_TIMEOUT_S)

    def shutdown(self) -> None:
        with self._lock:
            if self.dht.is_alive():
                self.dht.shutdown()


def _end_with_parent(node_pid: int) -> None:
    """Runs in hivemind's DHT process, in a thread started before anything else: once the node that
    started it is gone (even by SIGKILL, even in the middle of this process's start-up), kill this
    process's group (itself and its p2pd) instead of lingering as an orphan that still answers for a
    dead node and holds its libp2p identity, which would make the node's restart be refused."""
    while os.getppid() == node_pid:
        time.sleep(0.5)
    group = os.getpgid(0)
    os.killpg(group, signal.SIGTERM)  # p2pd exits cleanly (removes its socket); this process ignores SIGTERM
    time.sleep(1.0)
    os.killpg(group, signal.SIGKILL)


async def _get_many(keys: List[str], _dht, node) -> Dict[str, dict]:
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    return {key: {subkey: (item.value, item.expiration_time) for subkey, item in result.value.items()}
            for key, result in found.items() if result is not None and isinstance(result.value, dict)}


async def _validator_stats(_dht, node) -> dict:
    validator = node.protocol.record_validator
    for item in getattr(validator, "_validators", [validator]):
        if isinstance(item, SwarmRecordValidator):
            return item.stats()
    return {}


async def _routing_table_size(_dht, node) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)
