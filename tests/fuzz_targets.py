"""Fuzz targets over every decoder of `protocol/` (and the checkpoint header parser): what hostile input looks like, and what each
decoder must promise about it.

A target is a hypothesis strategy of inputs and a check that raises `AssertionError` when the
decoder breaks its contract:
- it returns a value or raises a `ProtocolError` subclass, never any other exception;
- what it accepts is canonical: encoding the result again gives back the very input (one byte
  string, one key, one manifest per meaning), so no two inputs mean the same thing;
- valid inputs round-trip.

`tests/test_protocol_fuzz.py` runs each target a bounded number of times in CI; `benchmarks/fuzz.py`
runs them for minutes. Strategies here are shared with `tests/test_protocol_records.py`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict

from hypothesis import strategies as st

from ddm_models.checkpoint import MAX_STEP, CheckpointMetadata, InvalidCheckpoint
from ddm_models.configs import ExpertConfig

from protocol import blob_wire, keys
from protocol.encoding import canonical_decode, canonical_encode
from protocol.errors import ProtocolError
from protocol.hashing import BlobRef
from protocol.identity import Identity
from protocol.limits import MAX_BLOB_BYTES, MAX_RANGE_BYTES
from protocol.manifest import SwarmManifest
from protocol.policy import RecordPolicy, key_for_record
from protocol.jobs import Job
from protocol.records import (AuditRecord, CheckpointRecord, Claim, PeerRecord, ProviderRecord, Revocation,
                              RouterRecord, SignedRecord, SwarmBeacon, decode_record)
from tests.protocol_fixtures import PEER_ID, checkpoint_fields, manifest_dict

SIGNER = Identity.generate()

# --- valid building blocks --------------------------------------------------------------------------
hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
peer_ids = st.text(alphabet="123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz", min_size=32, max_size=60)
counts = st.integers(min_value=0, max_value=2**62)
steps = st.integers(min_value=0, max_value=MAX_STEP)  # protocol.limits.MAX_STEP bounds every record's step
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=40)
clusters = st.integers(0, 9999)
jobs = st.one_of(st.just("router"), clusters.map(lambda k: f"expert/{k}"))
maddr_lists = st.lists(st.integers(1, 65535).map(lambda p: f"/ip4/127.0.0.1/tcp/{p}"), max_size=8)
blobs = st.builds(BlobRef.of, st.integers(0, 2**36), hex64)

RECORDS = {
    "claim": st.builds(Claim, hex64, jobs, names, peer_ids, steps, st.sampled_from(["training", "released"]), times),
    "checkpoint": st.builds(CheckpointRecord, hex64, clusters, names, st.sampled_from(["fm", "ddpm"]), hex64,
                            steps, counts, st.floats(0, 1e6), blobs, blobs, st.one_of(st.just(""), hex64), times, times),
    "router": st.builds(RouterRecord, hex64, names, hex64, st.integers(1, 9999), steps, counts, st.floats(0, 1),
                        blobs, blobs, st.one_of(st.just(""), hex64), times, times),
    "provider": st.builds(ProviderRecord, hex64, blobs, peer_ids, maddr_lists, times),
    "peer": st.builds(PeerRecord, hex64, peer_ids, maddr_lists, st.sampled_from(["trainer", "client", "bootstrap"]),
                      st.one_of(st.just(""), jobs), st.sampled_from(["joining", "online", "offline"]), names, times),
    "beacon": st.builds(SwarmBeacon, hex64, names, st.integers(1, 100), times),
    "audit": st.builds(AuditRecord, hex64, clusters, hex64, hex64, counts, st.floats(0, 1e6), counts,
                       st.integers(1, 2**31), hex64,
                       st.one_of(st.just(""), st.lists(st.text(alphabet="0123456789abcdef", min_size=16, max_size=16),
                                                       min_size=1, max_size=8).map("".join)), times, times),
    "revocation": st.builds(Revocation, hex64, st.sampled_from(["signer", "checkpoint"]), hex64,
                            st.text(max_size=40), times, times),
}
records = st.one_of(*RECORDS.values())

# --- hostile building blocks ------------------------------------------------------------------------
# Anything canonical msgpack can carry (ints within msgpack's 64-bit range).
msgpack_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                            st.floats(allow_nan=False), st.text(max_size=80), st.binary(max_size=80))
msgpack_values = st.recursive(msgpack_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)), max_leaves=12)
# Anything `yaml.safe_load` can produce: also NaN, huge ints, dates, sets and non-string keys.
yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**80, 2**80), st.floats(), st.text(max_size=24),
                         st.binary(max_size=8), st.dates(), st.datetimes())
yaml_keys = st.one_of(st.text(max_size=12), st.integers(-5, 5), st.booleans(), st.none(), st.floats(),
                      st.sampled_from([math.inf, -math.inf, 1.5, "01", " 1"]))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(yaml_keys, inner, max_size=4),
    st.sets(st.one_of(st.integers(), st.text(max_size=4)), max_size=3)), max_leaves=10)


def near_miss(value: Any) -> st.SearchStrategy:
    """Values that differ from `value` only a little: the forms a lax parser would confuse with it."""
    options = [msgpack_scalars]
    if isinstance(value, str):
        # each its own branch: the lax-parser classics (a trailing newline, a leading zero) come up often
        options += [st.just(value + "\n"), st.just(value.replace("/", "/0")), st.sampled_from(
            [" " + value, value.upper(), "0" + value, value[:-1], value + "/", value.replace("/", "//"), value + "\x00"])]
    if isinstance(value, bool):
        options += [st.sampled_from([not value, int(value)])]
    elif isinstance(value, int):
        near = [float(value), value - 1, value + 1, -value, str(value), True]
        # only what msgpack can carry: a neighbour past its 64-bit range would fail in the encoder, not the decoder
        options += [st.sampled_from([v for v in near if not isinstance(v, int) or -2**63 <= v <= 2**64 - 1])]
    if isinstance(value, float):
        options += [st.sampled_from([int(value) if math.isfinite(value) else 0, math.nan, math.inf, -value, str(value)])]
    if isinstance(value, (list, dict)):
        options += [st.just(list(value) if isinstance(value, dict) else {}), st.just([])]
    return st.one_of(*options)


def _slots(data: Any):
    """(container, key) for every value inside nested dicts and lists."""
    if isinstance(data, dict):
        for key in list(data):
            yield data, key
            yield from _slots(data[key])
    elif isinstance(data, list):
        for index in range(len(data)):
            yield data, index
            yield from _slots(data[index])


@st.composite
def mutated(draw, base: Any, values: st.SearchStrategy, max_edits: int = 3,
            keys: st.SearchStrategy = st.text(max_size=12)) -> Any:
    """`base` (nested dicts and lists) with 1..max_edits values replaced, deleted or added."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_edits))):
        slots = list(_slots(data))
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        action = draw(st.sampled_from(["near", "replace", "delete", "add"]))
        if action == "near":
            container[key] = draw(near_miss(container[key]))
        elif action == "replace":
            container[key] = draw(values)
        elif action == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[draw(keys)] = draw(values)
        else:
            container.append(draw(values))
    return data


def _refused_or(decode: Callable[[], Any], accepted: Callable[[Any], None]) -> None:
    """Run `decode`: a `ProtocolError` is a refusal; any other exception breaks the contract."""
    try:
        value = decode()
    except ProtocolError:
        return
    except Exception as error:  # noqa: BLE001 - this is what the fuzzer looks for
        raise AssertionError(f"decoder raised {type(error).__name__}, not a ProtocolError: {error}") from error
    accepted(value)


def _canonical_hex(value: str) -> bool:
    return isinstance(value, str) and len(value) == 64 and bytes.fromhex(value).hex() == value


# --- canonical msgpack ------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_canonical_round_trip(value: Any) -> None:
    data = canonical_encode(value)
    _refused_or(lambda: canonical_decode(data, max_bytes=1 << 20),
                lambda decoded: _assert(decoded == _plain(value), "a canonical encoding decodes to its value"))


def check_canonical_bytes(data: bytes) -> None:
    _refused_or(lambda: canonical_decode(data),
                lambda value: _assert(canonical_encode(value) == data, "accepted bytes are canonical"))


canonical_inputs = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda v: canonical_encode(v), msgpack_values),
    st.tuples(msgpack_values, st.integers(0, 200), st.integers(1, 255)).map(
        lambda a: _flip(canonical_encode(a[0]), a[1], a[2])),
)


def _flip(data: bytes, index: int, mask: int) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    out[index % len(out)] ^= mask
    return bytes(out)


# --- records ----------------------------------------------------------------------------------------
def check_record_round_trip(record: SignedRecord) -> None:
    signed = record.signed_by(SIGNER)
    _assert(decode_record(signed.encode()) == signed, "a signed record round-trips")


@st.composite
def near_record_wire(draw, kind: str) -> bytes:
    """A signed record's wire map with a few fields changed, added or dropped, often signed again."""
    record = draw(RECORDS[kind]).signed_by(SIGNER)
    wire = canonical_decode(record.encode())
    payload = draw(mutated({k: v for k, v in wire.items() if k != "sig"}, msgpack_values))
    if not isinstance(payload, dict):
        return canonical_encode(payload)
    sig = SIGNER.sign(canonical_encode(payload)) if draw(st.booleans()) else draw(near_miss(wire["sig"]))
    return canonical_encode({**payload, "sig": sig})


def check_record_bytes(data: bytes) -> None:
    def accepted(record: SignedRecord) -> None:
        _assert(record.encode() == data, "an accepted record re-encodes to its bytes")
        _assert(_canonical_hex(record.signer), "the signer id is canonical hex")  # type: ignore[attr-defined]
        for blob in (getattr(record, "blob", None), getattr(record, "inference", None)):
            if blob is not None:
                _assert(_canonical_hex(blob.sha256), "the blob sha256 is canonical hex")
        job = getattr(record, "job", None)
        if job is not None:
            _assert(Job.parse(str(job)) == job, "the job names its cluster one way only")

    _refused_or(lambda: decode_record(data), accepted)


# --- DHT keys ---------------------------------------------------------------------------------------
def _rebuild(parsed: keys.ParsedKey) -> str:
    if parsed.family == "beacon":
        return keys.beacon_key(parsed.swarm_name)
    if parsed.family == "ckpt":
        return keys.checkpoint_key(parsed.swarm_id, parsed.cluster)
    if parsed.family == "providers":
        return f"{parsed.swarm_id}/providers/{parsed.ref_id}"  # a key names the reference's digest only
    if parsed.family == "audits":
        return keys.audits_key(parsed.swarm_id, parsed.target)
    if parsed.family == "revoked":
        return keys.revocation_key(parsed.swarm_id, parsed.target)
    return f"{parsed.swarm_id}/{parsed.family}"


valid_keys = st.one_of(
    hex64.map(keys.claims_key), hex64.map(keys.router_key), hex64.map(keys.peers_key),
    st.builds(keys.checkpoint_key, hex64, clusters), st.builds(keys.providers_key, hex64, blobs),
    st.builds(keys.audits_key, hex64, hex64), st.builds(keys.revocation_key, hex64, hex64),
    st.text(alphabet="abcxyzABC019._-", min_size=1, max_size=64).map(keys.beacon_key))
key_inputs = st.one_of(valid_keys, valid_keys.flatmap(near_miss), st.text(max_size=140),
                       st.builds(lambda a, b: a + b, valid_keys, st.text(max_size=4)), msgpack_scalars)


def check_parse_key(key: Any) -> None:
    _refused_or(lambda: keys.parse_key(key),
                lambda parsed: _assert(_rebuild(parsed) == key, f"key {key!r} is the canonical form of its parts"))


def check_valid_key_parses(key: str) -> None:
    _assert(_rebuild(keys.parse_key(key)) == key, "a key built by protocol.keys parses back to its parts")


# --- the record policy (what every DHT peer runs on a store request) --------------------------------
POLICY_MANIFEST = SwarmManifest.from_dict(manifest_dict())
POLICY = RecordPolicy(POLICY_MANIFEST)


def _valid_entry_record(kind: str, now: float) -> SignedRecord:
    if kind == "audit":
        return AuditRecord(POLICY_MANIFEST.swarm_id, 0, "ab" * 32, "cd" * 32, 40, 0.25, 7, 64, "ef" * 32,
                           "0123456789abcdef", now, now + 600)
    return CheckpointRecord(**checkpoint_fields(POLICY_MANIFEST, created_at=now, expires_at=now + 600))


@st.composite
def dht_entries(draw, kind: str = "checkpoint") -> tuple:
    """(key, subkey, value, expiration_time) near a valid `kind` entry of `POLICY_MANIFEST`."""
    now = time.time()
    record = _valid_entry_record(kind, now)
    if draw(st.booleans()):
        record = record.signed_by(SIGNER)
        value = record.encode()
    else:
        value = draw(near_record_wire(kind))
    key = draw(st.one_of(st.just(key_for_record(record)), key_inputs))
    subkey = draw(st.one_of(st.just(SIGNER.signer_id), near_miss(SIGNER.signer_id)))
    expiration = draw(st.one_of(st.just(now + 600), st.floats(), near_miss(now + 600.0)))
    return key, subkey, value, expiration, now


def check_policy_accept(entry: tuple) -> None:
    key, subkey, value, expiration, now = entry

    def accepted(record: SignedRecord) -> None:
        _assert(key == key_for_record(record), "a record lives only under its own key")
        _assert(subkey == record.signer, "the subkey is the signer")  # type: ignore[attr-defined]
        finite = isinstance(expiration, (int, float)) and not isinstance(expiration, bool) and math.isfinite(expiration)
        _assert(finite and expiration <= record.expires_at + 1.0,  # type: ignore[attr-defined]
                "the entry never outlives its signed expiry")

    _refused_or(lambda: POLICY.accept(key, subkey, value, expiration, now), accepted)


# --- the swarm manifest -----------------------------------------------------------------------------
@st.composite
def valid_manifest_dicts(draw) -> dict:
    k = draw(st.integers(1, 12))
    experts = [{"name": f"e{i}", "objective": draw(st.sampled_from(["fm", "ddpm"])),
                "architecture": draw(st.dictionaries(st.sampled_from(["size", "width", "depth", "heads"]),
                                                     st.one_of(st.integers(1, 512), names), max_size=3)),
                "training": draw(st.dictionaries(st.sampled_from(["lr", "batch_size"]),
                                                 st.floats(1e-6, 1.0), max_size=2))}
               for i in range(draw(st.integers(1, 3)))]
    signers = draw(st.lists(hex64, max_size=3, unique=True))
    return manifest_dict(
        name=draw(st.text(alphabet="abcXYZ019._-", min_size=1, max_size=64)), description=draw(st.text(max_size=40)),
        dataset={"kind": draw(st.sampled_from(["small-digits", "embedded-digits", "image-folder"])),
                 "image_size": draw(st.integers(1, 1024)), "channels": draw(st.integers(1, 4)),
                 "heldout_fraction": draw(st.floats(0.01, 0.99))},
        clustering={"num_clusters": k, "fine_clusters": draw(st.integers(k, 2048)), "seed": draw(counts)},
        experts=experts, cluster_experts={str(c): draw(st.sampled_from(experts))["name"]
                                          for c in draw(st.sets(st.integers(0, k - 1), max_size=3))},
        trust={"mode": "allowlist", "signers": signers} if signers else {"mode": "open"},
        timing={"lease_s": draw(st.floats(0.1, 600)), "checkpoint_every_steps": draw(st.integers(1, 10**6))},
        bootstrap_peers=draw(st.lists(st.just(f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}"), max_size=2)))


def check_manifest_round_trip(data: dict) -> None:
    manifest = SwarmManifest.from_dict(data)
    again = SwarmManifest.from_dict(manifest.to_file_dict())
    _assert(again == manifest and again.swarm_id == manifest.swarm_id, "a manifest's file form reads back the same")


manifest_inputs = st.one_of(valid_manifest_dicts().flatmap(lambda d: mutated(d, yaml_values, keys=yaml_keys)),
                            yaml_values)


def check_manifest_from_dict(data: Any) -> None:
    def accepted(manifest: SwarmManifest) -> None:
        _assert(len(manifest.swarm_id) == 64, "an accepted manifest has a swarm id")
        check_manifest_round_trip(manifest.to_file_dict())

    _refused_or(lambda: SwarmManifest.from_dict(data), accepted)


# --- blob transfer frames ---------------------------------------------------------------------------
@st.composite
def blob_requests(draw) -> blob_wire.BlobRequest:
    sha = draw(hex64)
    op = draw(st.sampled_from(["digests", "has", "range"]))
    if op != "range":
        return blob_wire.BlobRequest(op, sha)
    start = draw(st.integers(0, MAX_BLOB_BYTES - 1))
    end = draw(st.integers(start + 1, min(start + MAX_RANGE_BYTES, MAX_BLOB_BYTES)))
    return blob_wire.BlobRequest.range(sha, start, end)


blob_responses = st.one_of(
    st.integers(0, MAX_RANGE_BYTES).map(blob_wire.BlobResponse.ok),
    st.builds(blob_wire.BlobResponse.refuse, st.sampled_from(["not-found", "bad-request", "busy"]), st.text(max_size=300)))


def _frame_body(frame: bytes) -> dict:
    return canonical_decode(frame[blob_wire.FRAME_PREFIX_BYTES:])


request_frames = st.one_of(
    st.binary(max_size=300), blob_requests().map(lambda r: r.encode()),
    blob_requests().flatmap(lambda r: mutated(_frame_body(r.encode()), msgpack_values)).map(
        lambda body: blob_wire._frame(canonical_encode(body))),
    st.tuples(blob_requests(), st.integers(0, 300), st.integers(1, 255)).map(lambda a: _flip(a[0].encode(), a[1], a[2])))
response_frames = st.one_of(
    st.binary(max_size=600), blob_responses.map(lambda r: r.encode()),
    blob_responses.flatmap(lambda r: mutated(_frame_body(r.encode()), msgpack_values)).map(
        lambda body: blob_wire._frame(canonical_encode(body))),
    st.tuples(blob_responses, st.integers(0, 600), st.integers(1, 255)).map(lambda a: _flip(a[0].encode(), a[1], a[2])))


def check_request_frame(frame: bytes) -> None:
    def accepted(request: blob_wire.BlobRequest) -> None:
        _assert(request.encode() == frame, "an accepted request frame is canonical")
        _assert(request.op in ("digests", "has") or 0 < request.length <= MAX_RANGE_BYTES, "a range asks for a bounded size")

    _refused_or(lambda: blob_wire.decode_request_frame(frame), accepted)
    _refused_or(lambda: blob_wire.request_body_length(frame[:blob_wire.FRAME_PREFIX_BYTES]), lambda n: None)


def check_response_frame(frame: bytes) -> None:
    _refused_or(lambda: blob_wire.decode_response_frame(frame),
                lambda response: _assert(response.encode() == frame, "an accepted response frame is canonical"))
    _refused_or(lambda: blob_wire.response_body_length(frame[:blob_wire.FRAME_PREFIX_BYTES]), lambda n: None)


# --- identity key files -----------------------------------------------------------------------------
PEM = SIGNER.to_pem()
pem_inputs = st.one_of(st.binary(max_size=200), st.tuples(st.integers(0, len(PEM) - 1), st.integers(1, 255)).map(
    lambda a: _flip(PEM, a[0], a[1])), st.integers(0, len(PEM)).map(lambda n: PEM[:n]))


def check_identity_pem(data: bytes) -> None:
    _refused_or(lambda: Identity.from_pem(data),
                lambda identity: _assert(len(identity.signer_id) == 64, "an accepted key has a signer id"))


# --- checkpoint headers (ddm_models/checkpoint.py: a stranger's file's metadata) --------------------
HEADER = CheckpointMetadata(kind="expert", config=ExpertConfig(), cluster=0, step=7, samples_seen=448,
                            heldout_metric=0.25, extra={"seed": 0}).to_header()


def _json_mutated(text: str) -> st.SearchStrategy:
    return mutated(json.loads(text), msgpack_values.filter(lambda v: not isinstance(v, bytes))).map(
        lambda value: json.dumps(value, default=str))


header_inputs = st.one_of(
    mutated(HEADER, st.one_of(msgpack_values, st.text(max_size=40))),
    st.builds(lambda config, extra: {**HEADER, "config": config, "extra": extra},
              st.one_of(_json_mutated(HEADER["config"]), st.text(max_size=60),
                        st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)),
              st.one_of(_json_mutated(HEADER["extra"]), st.integers(1, 3000).map(lambda n: "{\"a\":" * n + "1" + "}" * n))),
    msgpack_values)


def check_checkpoint_header(header: Any) -> None:
    """`CheckpointMetadata.from_header` returns metadata whose step is bounded and whose config hashes
    to the header's claim, or raises `InvalidCheckpoint`; nothing else."""
    try:
        metadata = CheckpointMetadata.from_header(header, "fuzzed")
    except InvalidCheckpoint:
        return
    except Exception as error:  # noqa: BLE001 - this is what the fuzzer looks for
        raise AssertionError(f"header parser raised {type(error).__name__}: {str(error)[:200]}") from error
    _assert(0 <= metadata.step <= MAX_STEP, "an accepted step is within the protocol's bound")
    _assert(metadata.config_hash == header["config_hash"], "an accepted header's config hashes to its claim")


def _assert(condition: bool, promise: str) -> None:
    if not condition:
        raise AssertionError(f"broken promise: {promise}")


@dataclass(frozen=True)
class Target:
    strategy: st.SearchStrategy
    check: Callable[[Any], None]


TARGETS: Dict[str, Target] = {
    "canonical_decode/round-trip": Target(msgpack_values, check_canonical_round_trip),
    "canonical_decode/bytes": Target(canonical_inputs, check_canonical_bytes),
    **{f"decode_record/{kind}/round-trip": Target(strategy, check_record_round_trip)
       for kind, strategy in RECORDS.items()},
    **{f"decode_record/{kind}/mutated": Target(near_record_wire(kind), check_record_bytes) for kind in RECORDS},
    "decode_record/bytes": Target(st.binary(max_size=600), check_record_bytes),
    "parse_key/valid": Target(valid_keys, check_valid_key_parses),
    "parse_key/mutated": Target(key_inputs, check_parse_key),
    "RecordPolicy.accept": Target(dht_entries(), check_policy_accept),
    "RecordPolicy.accept/audit": Target(dht_entries("audit"), check_policy_accept),
    "SwarmManifest.from_dict/round-trip": Target(valid_manifest_dicts(), check_manifest_round_trip),
    "SwarmManifest.from_dict/mutated": Target(manifest_inputs, check_manifest_from_dict),
    "blob_wire/request": Target(request_frames, check_request_frame),
    "blob_wire/response": Target(response_frames, check_response_frame),
    "Identity.from_pem": Target(pem_inputs, check_identity_pem),
    "CheckpointMetadata.from_header": Target(header_inputs, check_checkpoint_header),
}
