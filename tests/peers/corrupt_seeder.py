"""A peer that announces itself as the provider of one data shard and serves it with one byte of
every chunk flipped (its stored digests stay right, so only a fetcher's check can tell):

    python -m tests.peers.corrupt_seeder MANIFEST SHARD_FILE INITIAL_PEER

Prints {"event": "ready", "peer_id": ...} once its provider record is in the DHT; runs until killed."""

import json
import sys
import threading

from node.blobs.service import BlobService
from node.blobs.store import BlobStore
from node.network import NetworkLoop
from node.swarm.announcer import Announcer
from node.swarm.manifest_files import read_manifest_file
from node.swarm.membership import SwarmMembership
from node.swarm.presence import Presence
from protocol.identity import Identity
from protocol.limits import CHUNK_BYTES

manifest_path, shard_file, peer = sys.argv[1:4]
store_dir = shard_file + ".corrupt-store"
membership = SwarmMembership(read_manifest_file(manifest_path), Identity.generate(), initial_peers=[peer],
                             host="127.0.0.1")
store = BlobStore(store_dir)
ref = store.put_file(shard_file)
with open(store.path(ref.sha256), "r+b") as data:  # flip a byte of every chunk on disk
    for offset in range(0, ref.size, CHUNK_BYTES):
        data.seek(offset)
        byte = data.read(1)
        data.seek(offset)
        data.write(bytes([byte[0] ^ 0xFF]))
loop = NetworkLoop()
blobs = BlobService(membership, store, loop)
announcer = Announcer(membership, Presence(membership, role="seeder"), lambda: 0)
announcer.provide(ref, now=True)
announcer.start()
while not membership.providers(ref):
    threading.Event().wait(0.5)
print(json.dumps({"event": "ready", "peer_id": membership.peer_id, "sha256": ref.sha256}), flush=True)
threading.Event().wait()
