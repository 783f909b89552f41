"""A peer that announces a checkpoint it should not: properly signed (by an allowed key or not),
with a step far ahead of everyone, but whose bytes are garbage or are served corrupted.

    python -m tests.peers.lying_node --manifest M --initial-peers A --identity KEY --cluster 0
        --behaviour garbage|corrupt|honest-record-unlisted

Prints one JSON line {"sha256": ..., "signer": ...} once announced, then keeps announcing.
"""

import argparse
import json
import os
import threading
import time
from pathlib import Path

from hivemind.utils.timed_storage import get_dht_time

from node.blob_service import BlobService
from node.blobstore import BlobStore
from node.keys import load_or_create_identity
from node.membership import SwarmMembership
from node.network import NetworkLoop
from node.swarm_files import read_manifest_file
from protocol.records import CheckpointRecord, ProviderRecord


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--cluster", type=int, default=0)
    parser.add_argument("--step", type=int, default=10**6)
    parser.add_argument("--behaviour", choices=["garbage", "corrupt"], required=True)
    parser.add_argument("--store", required=True)
    args = parser.parse_args()
    manifest = read_manifest_file(args.manifest)
    membership = SwarmMembership(manifest, load_or_create_identity(Path(args.identity)),
                                 initial_peers=args.initial_peers)
    store = BlobStore(args.store)
    loop = NetworkLoop()
    BlobService(membership, store, loop)
    ref = store.put_bytes(os.urandom(300_000))
    if args.behaviour == "corrupt":  # the signed hash is of the true bytes; what is served is not
        with open(store.path(ref.sha256), "r+b") as blob:
            blob.seek(1000)
            blob.write(b"\x00" * 64)
    spec = manifest.expert_for_cluster(args.cluster)
    now = get_dht_time()
    record = CheckpointRecord(membership.swarm_id, args.cluster, spec.name, spec.objective, spec.spec_hash,
                              args.step, args.step * 32, 0.001, ref, "", now, now + 600).signed_by(membership.identity)
    membership.publish(record, confirm=False)

    def keep_providing() -> None:
        while True:
            expires = get_dht_time() + 3 * manifest.timing.lease_s
            provider = ProviderRecord(membership.swarm_id, ref.sha256, membership.peer_id,
                                      tuple(membership.maddrs[:8]), expires)
            membership.publish(provider.signed_by(membership.identity), confirm=False)
            time.sleep(manifest.timing.lease_s)

    threading.Thread(target=keep_providing, daemon=True).start()
    print(json.dumps({"sha256": ref.sha256, "signer": membership.identity.signer_id}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
