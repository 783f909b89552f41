"""The swarm's signed records: small msgpack maps that peers put into the DHT.

Every record is a frozen dataclass. On the wire it is the canonical msgpack map of its fields plus
`kind`, `v` (protocol version) and `sig`, an ed25519 signature by `signer` over the same map
without `sig`. `decode_record` turns bytes from the network into a typed record or raises a typed
error; it checks shape and signature only. Whether a record is acceptable *here and now* (right
swarm, trusted signer, sane expiration, matching DHT key) is `protocol.policy`'s job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Type, TypeVar

from protocol import fields as f
from protocol.encoding import canonical_decode, canonical_encode
from protocol.errors import BadSignature, InvalidRecord, RecordTooLarge, SwarmVersionMismatch
from protocol.hashing import BlobRef
from protocol.identity import Identity, verify_signature
from protocol.jobs import Job
from protocol.limits import MAX_RECORD_BYTES, MAX_STEP, PROTOCOL_VERSION

OBJECTIVES = ("fm", "ddpm")
CLAIM_STATES = ("training", "released")
# a trainer announces its lifecycle state (`node.trainer.state.NodeState`); clients and bootstrap
# peers are "online"; "offline" is the tombstone a leaving peer writes
PEER_STATES = ("joining", "claiming", "resuming", "training", "moving", "handing-over", "serving", "leaving",
               "online", "offline")
# the states in which a peer holds and serves checkpoints (it has joined, and it is not leaving)
SERVING_STATES = ("claiming", "resuming", "training", "moving", "serving", "online")
PEER_ROLES = ("trainer", "client", "bootstrap", "seeder")

R = TypeVar("R", bound="SignedRecord")
_REGISTRY: Dict[str, Type["SignedRecord"]] = {}


def _common_fields() -> dict:
    return {"swarm_id": f.sha256_hex(), "expires_at": f.real(0.0), "signer": f.text(max_chars=64, allow_empty=True)}


class SignedRecord:
    """Base of every record. Subclasses are frozen dataclasses ending with `signer`, `signature`."""

    KIND: ClassVar[str]
    FIELDS: ClassVar[Dict[str, f.Checker]]
    VERSIONED: ClassVar[bool] = True  # beacons are readable across protocol versions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.KIND] = cls

    def __post_init__(self) -> None:
        for name, check in self.FIELDS.items():
            object.__setattr__(self, name, check(name, getattr(self, name), False))
        if self.signature and not self.signer:  # type: ignore[attr-defined]
            raise InvalidRecord(f"{self.KIND} record: a signature needs a signer")

    # --- wire form -------------------------------------------------------------------------------
    def _payload(self) -> dict:
        payload: Dict[str, Any] = {"kind": self.KIND, "v": self._wire_version()}
        for name in self.FIELDS:
            value = getattr(self, name)
            if isinstance(value, (BlobRef, Job)):
                value = value.to_wire()
            elif value is None:  # the only optional field is a peer's job, written as ""
                value = ""
            payload[name] = value
        return payload

    def _wire_version(self) -> int:
        return PROTOCOL_VERSION

    def signing_bytes(self) -> bytes:
        return canonical_encode(self._payload())

    def signed_by(self: R, identity: Identity) -> R:
        """A copy of this record with `signer` set to `identity` and a fresh signature."""
        draft = dataclasses.replace(self, signer=identity.signer_id, signature=b"")
        object.__setattr__(draft, "signature", identity.sign(draft.signing_bytes()))
        return draft

    def renewed(self: R, identity: Identity, expires_at: float) -> R:
        """The same record living until `expires_at`, signed again (a newer expiry wins in the DHT)."""
        return dataclasses.replace(self, expires_at=expires_at, signature=b"").signed_by(identity)  # type: ignore[call-arg]

    def encode(self) -> bytes:
        if not self.signature:  # type: ignore[attr-defined]
            raise InvalidRecord(f"{self.KIND} record is not signed; call signed_by(identity) first")
        data = canonical_encode({**self._payload(), "sig": self.signature})  # type: ignore[attr-defined]
        if len(data) > MAX_RECORD_BYTES:
            raise RecordTooLarge(f"{self.KIND} record is {len(data)} bytes, over the limit of {MAX_RECORD_BYTES}")
        return data

    def verify(self) -> None:
        """Raise `BadSignature` unless the record is signed by its `signer`."""
        verify_signature(self.signer, self.signing_bytes(), self.signature)  # type: ignore[attr-defined]


def decode_record(data: bytes, expected: Type[R] | None = None) -> R:
    """Bytes from the network -> a typed, signature-checked record, or a typed `ProtocolError`."""
    wire = canonical_decode(data)
    if not isinstance(wire, dict):
        raise InvalidRecord("record: expected a msgpack map")
    kind, version = wire.get("kind"), wire.get("v")
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise InvalidRecord(f"record: unknown kind {str(kind)[:32]!r}")
    if expected is not None and cls is not expected:
        raise InvalidRecord(f"record: expected a {expected.KIND} record, got {cls.KIND}")
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidRecord("record: field 'v' (protocol version) must be an integer")
    if cls.VERSIONED and version != PROTOCOL_VERSION:
        raise SwarmVersionMismatch(
            f"{cls.KIND} record speaks protocol version {version}, this node speaks {PROTOCOL_VERSION}; "
            "upgrade ddm-swarm (or join a swarm of your version)",
        )
    expected_keys = {"kind", "v", "sig", *cls.FIELDS}
    if set(wire) != expected_keys:
        missing, extra = expected_keys - set(wire), set(wire) - expected_keys
        raise InvalidRecord(f"{cls.KIND} record: missing fields {sorted(missing)}, unknown fields {sorted(extra)[:8]}")
    values = {name: check(name, wire[name], True) for name, check in cls.FIELDS.items()}
    record = cls(**values, signature=f.signature()("sig", wire["sig"], True))  # type: ignore[call-arg]
    if not record.signature:
        raise BadSignature(f"{cls.KIND} record carries no signature")
    if record.signing_bytes() != canonical_encode({k: v for k, v in wire.items() if k != "sig"}):
        raise InvalidRecord(f"{cls.KIND} record: payload does not re-encode to the signed bytes")
    record.verify()
    return record  # type: ignore[return-value]


@dataclass(frozen=True)
class Claim(SignedRecord):
    """A lease on a job ("expert/<k>" or "router"), renewed every T and expiring after about 3T."""

    KIND: ClassVar[str] = "claim"
    FIELDS: ClassVar = {**_common_fields(), "job": f.job(), "model": f.text(),
                        "peer_id": f.peer_id(), "step": f.integer(0, MAX_STEP), "state": f.text(choices=CLAIM_STATES)}
    swarm_id: str
    job: Job
    model: str
    peer_id: str
    step: int
    state: str
    expires_at: float
    signer: str = ""
    signature: bytes = b""

    @property
    def cluster(self) -> int | None:
        return self.job.cluster


@dataclass(frozen=True)
class CheckpointRecord(SignedRecord):
    """A trained expert checkpoint of one cluster, content-addressed by its two blobs: the training
    state (`blob`) and the inference export of the same EMA weights (`inference`)."""

    KIND: ClassVar[str] = "checkpoint"
    FIELDS: ClassVar = {**_common_fields(), "cluster": f.integer(0, 9999), "model": f.text(),
                        "objective": f.text(choices=OBJECTIVES), "spec_hash": f.sha256_hex(),
                        "step": f.integer(0, MAX_STEP), "samples_seen": f.integer(), "heldout_loss": f.real(0.0),
                        "blob": f.blob_ref(), "inference": f.blob_ref(), "parent": f.sha256_hex(allow_empty=True),
                        "created_at": f.real(0.0)}
    swarm_id: str
    cluster: int
    model: str
    objective: str
    spec_hash: str
    step: int
    samples_seen: int
    heldout_loss: float
    blob: BlobRef  # the training state (EMA, weights, AdamW moments): for resuming and mirrors
    inference: BlobRef  # the EMA weights alone in 16 bits: what a generator fetches
    parent: str
    created_at: float
    expires_at: float
    signer: str = ""
    signature: bytes = b""

    @property
    def job(self) -> Job:
        return Job.expert(self.cluster)


@dataclass(frozen=True)
class RouterRecord(SignedRecord):
    """A trained router checkpoint: p(cluster | x_t, t) over the swarm's clusters."""

    KIND: ClassVar[str] = "router"
    FIELDS: ClassVar = {**_common_fields(), "model": f.text(), "spec_hash": f.sha256_hex(),
                        "num_clusters": f.integer(1, 9999), "step": f.integer(0, MAX_STEP), "samples_seen": f.integer(),
                        "heldout_accuracy": f.real(0.0, 1.0), "blob": f.blob_ref(), "inference": f.blob_ref(),
                        "parent": f.sha256_hex(allow_empty=True), "created_at": f.real(0.0)}
    swarm_id: str
    model: str
    spec_hash: str
    num_clusters: int
    step: int
    samples_seen: int
    heldout_accuracy: float
    blob: BlobRef  # the training state, as in CheckpointRecord
    inference: BlobRef  # the EMA weights alone in 16 bits
    parent: str
    created_at: float
    expires_at: float
    signer: str = ""
    signature: bytes = b""

    @property
    def job(self) -> Job:
        return Job.router()


@dataclass(frozen=True)
class ProviderRecord(SignedRecord):
    """`peer_id` serves `blob` (the whole reference: sha256, size, digest list) over the blob protocol."""

    KIND: ClassVar[str] = "provider"
    FIELDS: ClassVar = {**_common_fields(), "blob": f.blob_ref(), "peer_id": f.peer_id(),
                        "maddrs": f.maddrs()}
    swarm_id: str
    blob: BlobRef
    peer_id: str
    maddrs: tuple
    expires_at: float
    signer: str = ""
    signature: bytes = b""


@dataclass(frozen=True)
class PeerRecord(SignedRecord):
    """A peer's presence and lifecycle state (joining, online, offline as a tombstone)."""

    KIND: ClassVar[str] = "peer"
    FIELDS: ClassVar = {**_common_fields(), "peer_id": f.peer_id(), "maddrs": f.maddrs(),
                        "role": f.text(choices=PEER_ROLES), "job": f.job(allow_empty=True),
                        "state": f.text(choices=PEER_STATES), "software": f.text(max_chars=64)}
    swarm_id: str
    peer_id: str
    maddrs: tuple
    role: str
    job: Optional[Job]  # None: no job (a client, the bootstrap peer, a trainer still choosing)
    state: str
    software: str
    expires_at: float
    signer: str = ""
    signature: bytes = b""


@dataclass(frozen=True)
class SwarmBeacon(SignedRecord):
    """Under the swarm's *name*: which swarm id and protocol version peers of that name run.

    Its shape never changes across protocol versions, so a peer of another version can read it and
    be told clearly that it speaks another version or holds another manifest.
    """

    KIND: ClassVar[str] = "beacon"
    VERSIONED: ClassVar[bool] = False
    FIELDS: ClassVar = {**_common_fields(), "name": f.text(max_chars=64, pattern=r"^[A-Za-z0-9._-]+$"),
                        "protocol_version": f.integer(1, 2**31)}
    swarm_id: str
    name: str
    protocol_version: int
    expires_at: float
    signer: str = ""
    signature: bytes = b""

    def _wire_version(self) -> int:
        return self.protocol_version


REVOCATION_TARGETS = ("signer", "checkpoint")
# a perceptual hash of an audit's seeded samples: 16 hex chars (64 bits) per image, up to 8 images
_FINGERPRINT = r"^(?:[0-9a-f]{16}){1,8}$"


@dataclass(frozen=True)
class AuditRecord(SignedRecord):
    """An auditor's measurement of one expert checkpoint: its held-out loss on the cluster's held-out
    data, with (t, noise) drawn from `seed` (derived from the checkpoint's sha256, so honest auditors
    draw the same), over `images` images whose bytes hash to `data_sha256`; and a perceptual hash of a
    few samples drawn with fixed seeds (`fingerprint`, empty when not computed)."""

    KIND: ClassVar[str] = "audit"
    FIELDS: ClassVar = {**_common_fields(), "cluster": f.integer(0, 9999), "checkpoint": f.sha256_hex(),
                        "checkpoint_signer": f.sha256_hex(), "step": f.integer(), "loss": f.real(0.0),
                        "seed": f.integer(), "images": f.integer(1, 2**31), "data_sha256": f.sha256_hex(),
                        "fingerprint": f.text(max_chars=128, pattern=_FINGERPRINT, allow_empty=True),
                        "created_at": f.real(0.0)}
    swarm_id: str
    cluster: int
    checkpoint: str  # the audited blob's sha256
    checkpoint_signer: str  # who signed the audited checkpoint record (an auditor never counts for itself)
    step: int
    loss: float
    seed: int
    images: int
    data_sha256: str
    fingerprint: str
    created_at: float
    expires_at: float
    signer: str = ""
    signature: bytes = b""

    @property
    def job(self) -> Job:
        return Job.expert(self.cluster)


@dataclass(frozen=True)
class Revocation(SignedRecord):
    """The swarm operator (`trust.operator` of the manifest) withdraws a signer or one checkpoint:
    every peer refuses what it names. `target` is a signer id or a checkpoint blob's sha256."""

    KIND: ClassVar[str] = "revocation"
    FIELDS: ClassVar = {**_common_fields(), "target_kind": f.text(choices=REVOCATION_TARGETS),
                        "target": f.sha256_hex(), "reason": f.text(max_chars=200, allow_empty=True),
                        "created_at": f.real(0.0)}
    swarm_id: str
    target_kind: str
    target: str
    reason: str
    created_at: float
    expires_at: float
    signer: str = ""
    signature: bytes = b""
