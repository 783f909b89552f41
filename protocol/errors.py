"""Typed errors of the swarm contract.

Every error carries a message a user can act on: what was refused, and why. Anything decoded from
the network that breaks the contract raises a subclass of `ProtocolError`; callers log it and drop
the input, never crash.
"""


class ProtocolError(Exception):
    """Input from the network, a file or a user breaks the swarm's contract."""


class InvalidRecord(ProtocolError):
    """A record is malformed: not canonical msgpack, wrong fields or types, out-of-range values."""


class RecordTooLarge(InvalidRecord):
    """An encoded record is larger than `limits.MAX_RECORD_BYTES`."""


class BadSignature(InvalidRecord):
    """A record's ed25519 signature does not verify against its signer."""


class UntrustedSigner(InvalidRecord):
    """A record is signed by a key the swarm's trust policy does not allow."""


class ExpirationTooFar(InvalidRecord):
    """A record asks to live further ahead than its kind allows (key squatting)."""


class RecordExpired(InvalidRecord):
    """A record's expiration time has passed."""


class SwarmVersionMismatch(ProtocolError):
    """A record or peer belongs to another swarm or speaks another protocol version."""


class InvalidManifest(ProtocolError):
    """A swarm manifest (or config) file is malformed; the message names the field."""


class InvalidIdentity(ProtocolError):
    """An identity key file is missing, unreadable, malformed or has unsafe permissions."""


class HashMismatch(ProtocolError):
    """Bytes do not hash to the content id that a signed record promised."""


class InvalidBlobRequest(ProtocolError):
    """A blob request from a peer is malformed, oversized or asks for an impossible range."""


class InvalidBlobResponse(ProtocolError):
    """A blob provider answered with a malformed header or a byte count that does not fit the request."""
