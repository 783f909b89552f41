"""A real swarm peer in its own process, driven by JSON lines on stdin (one reply line each).

Honest mode runs `SwarmMembership` exactly as a node does. `--adversary` runs a bare hivemind DHT
without the swarm's validator, so it can try to push anything into the swarm.
"""

import argparse
import json
import sys
import time
from functools import partial

from node.swarm.membership import WholeMessageDHT
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue

from node.blobs.service import BlobService
from node.blobs.store import BlobStore
from node.swarm.membership import SwarmMembership
from node.network import NetworkLoop
from node.swarm.manifest_files import read_manifest_file
from protocol.hashing import BlobRef
from protocol.identity import Identity
from protocol.records import decode_record
from tests.peers.flood import flood_entries

FAMILIES = {"claims": "claims", "peers": "peers", "router": "routers"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--adversary", action="store_true")
    args = parser.parse_args()
    manifest = read_manifest_file(args.manifest)
    if args.adversary:
        dht = WholeMessageDHT(initial_peers=args.initial_peers or None, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                  nat_port_map=False, auto_nat=False)
        membership, peer_id = None, str(dht.peer_id)
    else:
        membership = SwarmMembership(manifest, Identity.generate(), initial_peers=args.initial_peers)
        dht, peer_id = membership.dht, membership.peer_id
    print(json.dumps({"peer_id": peer_id, "maddrs": [str(m) for m in dht.get_visible_maddrs()]}), flush=True)

    blobs = None
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "quit":
            break
        if op == "publish":  # an encoded, signed record, published the honest way
            membership.publish(decode_record(bytes.fromhex(command["record"])))
            reply = {"ok": True}
        elif op == "store_raw":  # whatever bytes, under whatever key and subkey, with any expiration
            stored = dht.store(command["key"], bytes.fromhex(command["value"]), command["expiration"],
                               subkey=command["subkey"])
            reply = {"stored": bool(stored)}
        elif op == "read":
            started = time.monotonic()
            if command["family"] == "checkpoints":
                records = membership.checkpoints(command["cluster"])
            elif command["family"] == "providers":
                records = membership.providers(BlobRef(**command["ref"]))
            elif command["family"] == "audits":
                records = membership.audits_of([command["sha256"]]).get(command["sha256"], [])
            else:
                records = getattr(membership, FAMILIES[command["family"]])()
            reply = {"records": [r.encode().hex() for r in records], "seconds": time.monotonic() - started}
        elif op == "flood":  # thousands of valid records from fresh identities, made and stored in the DHT process
            # (hivemind's pipe to its DHT process cannot carry megabytes of arguments)
            stored = dht.run_coroutine(partial(_flood, args.manifest, command["family"], command["count"],
                                               command.get("options", {})))
            reply = {"stored": stored}
        elif op == "get_raw":
            found = dht.get(command["key"], latest=True)
            subkeys = list(found.value) if found is not None and isinstance(found.value, dict) else []
            reply = {"subkeys": subkeys}
        elif op == "fetch":  # download a blob from its providers in the swarm and verify it, then forget it
            if blobs is None:
                blobs = BlobService(membership, BlobStore(command["store"]), NetworkLoop(), serve=False)
            ref = BlobRef(command["sha256"], command["size"], command["chunks_sha256"])
            started = time.monotonic()
            try:
                blobs.fetch(ref, timeout=command.get("timeout_s", 120))
                blobs.store.verify(ref.sha256)
                blobs.store.delete(ref.sha256)  # the next check must download it again
                reply = {"ok": True, "seconds": time.monotonic() - started}
            except Exception as error:  # noqa: BLE001 - the caller counts failures and reports why
                reply = {"ok": False, "error": f"{type(error).__name__}: {error}"[:300]}
        elif op == "stored_here":  # how many entries this peer's own DHT storage holds under a key
            reply = {"entries": dht.run_coroutine(partial(_stored_here, command["key"]))}
        elif op == "stats":
            reply = membership.validator_stats()
        elif op == "time":
            reply = {"time": time.time()}
        else:
            reply = {"error": f"unknown op {op}"}
        print(json.dumps(reply), flush=True)
    if blobs is not None:
        blobs.stop()
        blobs.loop.stop()
    if membership is not None:
        membership.shutdown()
    else:
        dht.shutdown()


async def _stored_here(key: str, _dht, node) -> int:
    found = node.protocol.storage.get(DHTID.generate(source=key))
    return len(found.value) if found is not None and isinstance(found.value, DictionaryDHTValue) else 0


FLOOD_BATCH = 1000  # entries per store request: hivemind messages are capped at 4 MiB


async def _flood(manifest_path: str, family: str, count: int, options: dict, _dht, node) -> int:
    entries = flood_entries(read_manifest_file(manifest_path), family, count, **options)
    stored = 0
    for start in range(0, len(entries), FLOOD_BATCH):
        keys, subkeys, values, expirations = (list(column) for column in zip(*entries[start:start + FLOOD_BATCH]))
        result = await node.store_many(keys, values, expirations, subkeys=subkeys)
        stored += len(keys) if all(result.values()) else 0
    return stored


if __name__ == "__main__":
    main()
