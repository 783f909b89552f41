"""The swarm's contract: records, signatures, hashes, keys, limits. Pure: no I/O, no networking."""

from protocol.errors import (BadSignature, ExpirationTooFar, HashMismatch, InvalidIdentity, InvalidManifest,
                             InvalidRecord, ProtocolError, RecordExpired, RecordTooLarge, SwarmVersionMismatch,
                             UntrustedSigner)
from protocol.hashing import BlobHasher, BlobRef, blob_ref_of, sha256_hex
from protocol.identity import Identity, verify_signature
from protocol.limits import PROTOCOL_VERSION
from protocol.manifest import ModelSpec, SwarmManifest, TrustPolicy
from protocol.policy import RecordPolicy, describe_beacon
from protocol.records import (CheckpointRecord, Claim, PeerRecord, ProviderRecord, RouterRecord, SignedRecord,
                              SwarmBeacon, decode_record)
