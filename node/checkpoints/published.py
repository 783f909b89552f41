"""What a node has published for its job, on disk, so that a restart knows which blobs the swarm may
still ask it for.

    jobs/<job>/<model>/published.json   {"record": hex of the latest signed checkpoint record,
                                         "blob": its state blob's sha256, "step": its step,
                                         "previous": the state blob before it,
                                         "others": the inference blobs of both}

The file is written (atomically) after the checkpoint's blob is in the store and before its record
is announced. So the blob of every record this node may have in the DHT is one of: the latest one
here (announced now, or about to be), the one before it (whose announcement a crash may have cut
off), or the last one the DHT confirmed (`Announcer.confirmed`). The node's gc keeps all three.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Set, Union

from node.errors import NodeError
from node.files import atomic_write_bytes
from protocol.errors import ProtocolError
from protocol.records import CheckpointRecord, RouterRecord, decode_record

Record = Union[CheckpointRecord, RouterRecord]


class UnreadableNodeFile(NodeError):
    """A file a node wrote for itself is corrupt; the message names it and what to do."""


class PublishedCheckpoints:
    """The latest checkpoint record this node published for one job, and the blob before it."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "published.json"
        self.record: Optional[Record] = None
        self.blob: Optional[str] = None
        self.step = 0
        self.previous: Optional[str] = None
        self.others: Set[str] = set()  # the inference blobs of the latest record and the one before
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            self.blob, self.step, self.previous = data["blob"], int(data["step"]), data.get("previous")
            self.others = set(data.get("others", []))  # files of older versions have one blob a record
            if data.get("record"):  # files of older versions hold only blob and step
                self.record = decode_record(bytes.fromhex(data["record"]))
                if self.record.blob.sha256 != self.blob:  # type: ignore[attr-defined]
                    raise ValueError("its record names another blob")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ProtocolError) as error:
            raise UnreadableNodeFile(
                f"{self.path} is corrupt ({type(error).__name__}: {error}); move it away and restart: the node "
                "keeps its training state and announces its next checkpoint afresh") from None

    def add(self, record: Record) -> None:
        """Remember `record` as the latest (its blob must already be in the store)."""
        sha = record.blob.sha256
        if self.blob is not None and self.blob != sha:
            self.previous = self.blob
            latest_inference = {self.record.inference.sha256} if self.record is not None else set()
            self.others = latest_inference | {record.inference.sha256}
        else:
            self.others.add(record.inference.sha256)
        self.record, self.blob, self.step = record, sha, record.step
        atomic_write_bytes(self.path, json.dumps({"record": record.encode().hex(), "blob": sha, "step": record.step,
                                                  "previous": self.previous,
                                                  "others": sorted(self.others)}).encode())

    def keep(self) -> Set[str]:
        """Blobs that must stay in the store: those of the latest published record and the one before it."""
        return {sha for sha in (self.blob, self.previous, *self.others) if sha}
