"""A real downloading peer for the blob tests: joins the providers' DHT and runs `fetch_blob`.

    python tests/peers/blob_fetcher.py --store DIR --ref SHA256:SIZE:CHUNKS_SHA256 --providers PEER_ID ...
        --initial-peers MADDR ... [--stall-timeout S] [--streams N] [--direct]

Prints JSON lines: {"event": "progress", "done": bytes, "total": bytes} as chunks verify, then
{"event": "done", "path": ..., "report": {...}} or {"event": "error", "type": ..., "message": ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json

from hivemind.dht import DHT
from hivemind.p2p import PeerID

from node.blobs.banlist import BanList
from node.blobs.direct import DirectRoutes
from node.blobs.fetch import FetchReport, fetch_blob
from node.blobs.store import BlobStore
from protocol.hashing import BlobRef


def say(**event) -> None:
    print(json.dumps(event), flush=True)


async def run(args: argparse.Namespace) -> None:
    sha256, size, chunks_sha256 = args.ref.split(":")
    ref = BlobRef(sha256, int(size), chunks_sha256)
    dht = DHT(initial_peers=args.initial_peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
              nat_port_map=False, auto_nat=False)
    p2p = await dht.replicate_p2p()
    report, bans = FetchReport(), BanList()
    routes = DirectRoutes() if args.direct else None
    try:
        path = await fetch_blob(p2p, ref, [PeerID.from_base58(p) for p in args.providers], BlobStore(args.store),
                                bans=bans, report=report, stall_timeout=args.stall_timeout,
                                streams_per_provider=args.streams, direct=routes,
                                progress=lambda done, total: say(event="progress", done=done, total=total))
        say(event="done", path=str(path), report=dataclasses.asdict(report),
            bans={ban.peer: ban.reason for ban in bans},
            direct={"opened": routes.opened, "refusals": routes.refusals} if routes else None)
    except Exception as error:
        say(event="error", type=type(error).__name__, message=str(error), report=dataclasses.asdict(report))
    finally:
        dht.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--ref", required=True)
    parser.add_argument("--providers", nargs="+", required=True)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--stall-timeout", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--direct", action="store_true", help="use providers' direct TCP ports where offered")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
