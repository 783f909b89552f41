"""A leaving node's hand-over, run by a real peer: it stores a blob, provides it, and waits (as a
stopping trainer does) until another peer holds it.

    python -m tests.peers.handover_peer --manifest M --initial-peers A --file BLOB --timeout S --store DIR

Prints {"event": "ready", "sha256": ..., "peer_id": ...} once it provides the blob, then
{"event": "handed-over", "result": bool, "seconds": s} when `hand_over` returns.
"""

import argparse
import inspect
import json
import threading
import time

from hivemind.utils.timed_storage import get_dht_time

from node.blobs.service import BlobService
from node.blobs.store import BlobStore
from node.network import NetworkLoop
from node.swarm.manifest_files import read_manifest_file
from node.swarm.membership import SwarmMembership
from node.trainer.handover import hand_over
from protocol.identity import Identity
from protocol.records import ProviderRecord


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--store", required=True)
    args = parser.parse_args()
    manifest = read_manifest_file(args.manifest)
    membership = SwarmMembership(manifest, Identity.generate(), initial_peers=args.initial_peers)
    store = BlobStore(args.store)
    ref = store.put_file(args.file)
    blobs = BlobService(membership, store, NetworkLoop())
    own = ProviderRecord(membership.swarm_id, ref, membership.peer_id, tuple(membership.maddrs[:8]),
                         get_dht_time() + 600)
    membership.publish(own.signed_by(membership.identity), confirm=False)
    print(json.dumps({"event": "ready", "sha256": ref.sha256, "peer_id": membership.peer_id}), flush=True)
    started = time.monotonic()
    extra = [blobs.holds] if "holds" in inspect.signature(hand_over).parameters else []  # older code had none
    result = hand_over(membership, ref, args.timeout, threading.Event(), *extra)
    print(json.dumps({"event": "handed-over", "result": result, "seconds": time.monotonic() - started}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
