"""A peer that announces a checkpoint record and serves its blob, honestly or not.

    python -m tests.peers.lying_node --manifest M --initial-peers A --identity KEY --cluster 0
        --behaviour garbage|corrupt|file [--file CKPT] [--step S] [--model NAME]
        [--stall-after-bytes N] [--provide-only] --store DIR

- garbage: the blob is random bytes (properly signed, with a step far ahead of everyone);
- corrupt: the signed hash is of the true bytes, what is served is not;
- file: the state blob is the checkpoint file `--file` (a real one, or a wrong-architecture or NaN
  one) and the inference blob its export, as poisoned as the file; with several files and steps,
  each record is signed by a fresh identity.
With garbage and corrupt, one blob is named as both the state and the inference export.
`--stall-after-bytes` serves that many body bytes, then stays connected and silent. `--provide-only`
announces itself as a provider of the blob but publishes no checkpoint record (a second copy).

Prints one JSON line {"sha256": ..., "sha256s": [state blobs], "inference_sha256s": [...], "refs" and
"inference_refs" (the same blobs, whole references),
"signer": ..., "peer_id": ...} once announced, then keeps providing.
"""

import argparse
import json
import os
import threading
import time
from pathlib import Path

from hivemind.utils.timed_storage import get_dht_time

from node.blobs.service import BlobService
from node.blobs.store import BlobStore
from node.identity_files import load_or_create_identity
from node.swarm.membership import SwarmMembership
from node.network import NetworkLoop
from node.swarm.manifest_files import read_manifest_file
from protocol.identity import Identity
from protocol.records import CheckpointRecord, ProviderRecord
from tests.checkpoint_fixtures import write_export_as_is
from tests.peers.blob_provider import MisbehavingServer
from safetensors import SafetensorError


def export_of(path: Path, out: Path, store, blob):
    """The inference blob a lying record names beside `path`'s: an export written as-is from a
    checkpoint file, or the file itself when it is none (a test's arbitrary bytes)."""
    try:
        return store.put_file(write_export_as_is(path, out))
    except SafetensorError:
        return blob


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--cluster", type=int, default=0)
    parser.add_argument("--step", type=int, nargs="+", default=[10**6])
    parser.add_argument("--heldout-loss", type=float, default=0.001,
                        help="the loss the records claim (a liar's usual 0.001; an honest file claims what it has)")
    parser.add_argument("--model", default=None, help="model of the manifest (default: the cluster's)")
    parser.add_argument("--behaviour", choices=["garbage", "corrupt", "file"], required=True)
    parser.add_argument("--file", nargs="+", default=[], help="with several, each is announced by a fresh signer")
    parser.add_argument("--export", nargs="*", default=[], help="inference exports of the --file checkpoints, as they are")
    parser.add_argument("--stall-after-bytes", type=int, default=None)
    parser.add_argument("--provide-only", action="store_true")
    parser.add_argument("--store", required=True)
    args = parser.parse_args()
    manifest = read_manifest_file(args.manifest)
    membership = SwarmMembership(manifest, load_or_create_identity(Path(args.identity)),
                                 initial_peers=args.initial_peers)
    store = BlobStore(args.store)
    loop = NetworkLoop()
    service = BlobService(membership, store, loop, serve=args.stall_after_bytes is None)
    if args.stall_after_bytes is not None:
        server = MisbehavingServer(store, stall_after=args.stall_after_bytes, rate_mb_s=None)
        loop.run(server.start(service.p2p), timeout=60)
    blobs = [store.put_file(path) for path in args.file] if args.behaviour == "file" else \
        [store.put_bytes(os.urandom(300_000))]
    if args.export:  # exports written once by the test (safetensors headers are not byte-stable across writes)
        exports = [store.put_file(path) for path in args.export]
    else:
        exports = [export_of(Path(path), Path(args.store) / f"export-{index}.safetensors", store, blob)
                   for index, (path, blob) in enumerate(zip(args.file, blobs))] if args.behaviour == "file" else list(blobs)
    if args.behaviour == "corrupt":  # the signed hash is of the true bytes; what is served is not
        with open(store.path(blobs[0].sha256), "r+b") as blob:
            blob.seek(1000)
            blob.write(b"\x00" * 64)
    signers = [membership.identity] + [Identity.generate() for _ in blobs[1:]]
    if not args.provide_only:
        spec = manifest.expert_spec(args.model) if args.model else manifest.expert_for_cluster(args.cluster)
        now = get_dht_time()
        for ref, export, step, signer in zip(blobs, exports, args.step, signers):
            record = CheckpointRecord(membership.swarm_id, args.cluster, spec.name, spec.objective, spec.spec_hash,
                                      step, step * 32, args.heldout_loss, ref, export, "", now, now + 600)
            membership.publish(record.signed_by(signer), confirm=False)

    def keep_providing() -> None:
        while True:
            expires = get_dht_time() + 3 * manifest.timing.lease_s
            for ref in {*blobs, *exports}:
                provider = ProviderRecord(membership.swarm_id, ref, membership.peer_id,
                                          tuple(membership.maddrs[:8]), expires)
                membership.publish(provider.signed_by(membership.identity), confirm=False)
            time.sleep(manifest.timing.lease_s)

    threading.Thread(target=keep_providing, daemon=True).start()
    print(json.dumps({"sha256": blobs[0].sha256, "sha256s": [ref.sha256 for ref in blobs],
                      "inference_sha256s": [ref.sha256 for ref in exports],
                      "refs": [ref.to_wire() for ref in blobs], "inference_refs": [ref.to_wire() for ref in exports],
                      "signer": membership.identity.signer_id, "peer_id": membership.peer_id}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
