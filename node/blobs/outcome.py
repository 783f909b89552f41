"""What a download ends with: its `FetchReport`, or a typed failure that names every provider tried
and why (`BlobUnavailable`, `NotProvided`). Kept apart from the fetcher (`node.blobs.fetch`) so that
callers catch them without importing the transfer machinery."""

from __future__ import annotations

from dataclasses import dataclass, field

from node.errors import NodeError
from protocol.hashing import BlobRef


def ref_key(ref: BlobRef) -> str:
    """The scope of bans and partial downloads: the whole reference, not the sha256 alone."""
    return f"{ref.sha256}-{ref.size}-{ref.chunks_sha256}"


class BlobUnavailable(NodeError):
    """No provider could deliver a blob. `reasons` maps each provider tried to why it failed."""

    def __init__(self, ref: BlobRef, reasons: dict[str, str], missing_chunks: int) -> None:
        self.ref, self.reasons, self.missing_chunks = ref, dict(reasons), missing_chunks
        listing = "; ".join(f"{peer}: {why}" for peer, why in reasons.items()) or "no providers were given"
        super().__init__(f"blob {ref.sha256[:12]} ({ref.size} bytes): {missing_chunks} chunks still missing and no "
                         f"provider can deliver them ({listing}). The partial download is kept; retry with other "
                         f"providers.")


class NotProvided(BlobUnavailable):
    """No provider answered "ok" to anything: nobody provides this blob, whatever records claim."""


@dataclass
class FetchReport:
    """What one `fetch_blob` call did; filled in as it runs."""

    chunks_total: int = 0
    chunks_resumed: int = 0
    pieces_resumed: int = 0  # rests of chunks fetched on a new stream after a stream was cut mid-chunk
    chunks_fetched: dict[str, int] = field(default_factory=dict)
    banned: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def fetched(self) -> int:
        return sum(self.chunks_fetched.values())
