"""Typed errors of a running node, each with a message that says what to do."""


class NodeError(Exception):
    """Something a node could not do; the message tells the user how to fix it."""


class JoinFailed(NodeError):
    """No initial peer answered, or the local DHT peer could not start."""


class InvalidPeerAddress(NodeError):
    """An --initial-peers entry is not a full multiaddr with a /p2p/<peer id> part."""


class PublishFailed(NodeError):
    """A record could not be confirmed in the DHT after retries."""


class UnknownSwarm(NodeError):
    """--swarm names neither a bundled swarm nor a readable manifest file."""


class DiskFull(NodeError):
    """The disk filled up while the node wrote its files; what was written before is intact."""


class InvalidJobSetup(NodeError):
    """The manifest's data or model specs cannot be turned into a trainable job on this peer."""
