"""A real downloading peer for the blob tests: joins the providers' DHT and runs `fetch_blob`.

    python tests/peers/blob_fetcher.py --store DIR --ref SHA256:SIZE:CHUNKS_SHA256 [...] --providers PEER_ID ...
        --initial-peers MADDR ... [--stall-timeout S] [--streams N] [--deadline S] [--fake-providers N] [--direct]

With several `--ref`, they are fetched one after another with one shared ban list (as a node's
`BlobService` does). `--fake-providers N` adds N made-up peer ids to the providers (records anyone
can sign). Prints JSON lines: {"event": "progress", "done": bytes, "total": bytes} as chunks verify,
then per ref {"event": "done", "path": ..., "report": {...}} or {"event": "error", "type": ...,
"message": ...}; each carries "ref" (its position) and "max_fds", the most file descriptors this
process had open so far.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os

from node.swarm.membership import WholeMessageDHT
from hivemind.p2p import PeerID

from node.blobs.banlist import BanList
from node.blobs.direct import DirectRoutes
from node.blobs.fetch import FetchReport, fetch_blob
from node.blobs.store import BlobStore
from protocol.hashing import BlobRef
from tests.peers.flood import random_peer_id


def say(**event) -> None:
    print(json.dumps(event), flush=True)


async def count_fds(peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], len(os.listdir("/proc/self/fd")))
        await asyncio.sleep(0.02)


async def run(args: argparse.Namespace) -> None:
    dht = WholeMessageDHT(initial_peers=args.initial_peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
              nat_port_map=False, auto_nat=False)
    p2p = await dht.replicate_p2p()
    bans, peak = BanList(), [0]
    base_fds = len(os.listdir("/proc/self/fd"))  # the process's own (interpreter, DHT pipes, p2pd socket)
    routes = DirectRoutes() if args.direct else None
    counter = asyncio.create_task(count_fds(peak))
    providers = [PeerID.from_base58(p) for p in args.providers]
    providers += [PeerID.from_base58(random_peer_id()) for _ in range(args.fake_providers)]
    try:
        for position, text in enumerate(args.ref):
            report = FetchReport()
            try:
                sha256, size, chunks_sha256 = text.split(":")
                ref = BlobRef(sha256, int(size), chunks_sha256)  # an inconsistent one is refused here
                path = await fetch_blob(p2p, ref, providers, BlobStore(args.store), bans=bans, report=report,
                                        stall_timeout=args.stall_timeout, streams_per_provider=args.streams, direct=routes,
                                        **({"deadline_s": args.deadline} if args.deadline else {}),
                                        progress=lambda done, total: say(event="progress", done=done, total=total))
                say(event="done", ref=position, path=str(path), report=dataclasses.asdict(report),
                    bans={ban.peer: ban.reason for ban in bans}, max_fds=peak[0], base_fds=base_fds,
                    direct={"opened": routes.opened, "refusals": routes.refusals} if routes else None)
            except Exception as error:
                say(event="error", ref=position, type=type(error).__name__, message=str(error),
                    report=dataclasses.asdict(report), bans={ban.peer: ban.reason for ban in bans}, max_fds=peak[0],
                    base_fds=base_fds)
    finally:
        counter.cancel()
        dht.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--ref", nargs="+", required=True)
    parser.add_argument("--providers", nargs="+", required=True)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--stall-timeout", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--direct", action="store_true", help="use providers' direct TCP ports where offered")
    parser.add_argument("--deadline", type=float, default=None)
    parser.add_argument("--fake-providers", type=int, default=0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
