"""A real provider peer for the blob tests: a hivemind DHT on 127.0.0.1, a BlobStore, a BlobServer.

    python tests/peers/blob_provider.py --store DIR --put FILE [--behaviour honest|corrupt|stall|bad-digests]
        [--stall-after-bytes N] [--rate-mb-s R] [--initial-peers MADDR ...] [--direct]

Prints JSON lines on stdout: first {"event": "ready", "maddrs": [...], "peer_id": ..., "ref": {...}},
then {"event": "stats", ...} whenever its server's counters change. Behaviours:
- honest: serves what it stores;
- corrupt: one byte of every chunk of its stored copy is flipped on disk (its digests stay right);
- bad-digests: its stored digest list is wrong;
- stall: serves `--stall-after-bytes` body bytes honestly, then stops sending, keeping streams open;
- trickle: answers every request (headers, digest list, chunks) truthfully, one byte every 0.7 s
  (slowloris: never silent long enough to look stalled);
- cut: closes every stream once it has sent `--cut-after-bytes` body bytes on it, in the middle of
  a chunk (what a circuit relay does at its data limit: go-libp2p's default is 128 KiB per circuit);
  with `--close-every N` it also closes every Nth stream before answering anything (a relay refusing
  a circuit now and then, a daemon short of stream slots for a moment).
`--rate-mb-s` throttles every range it sends (a slow but honest peer). `--direct` also serves on a
direct TCP port (node.blobs.direct); behaviour corrupt-direct flips a byte of every range sent there
(an on-path forger's work: its p2p answers stay honest).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import weakref

from node.swarm.membership import WholeMessageDHT

from node.blobs.direct import DirectServer
from node.blobs.server import BlobServer
from node.blobs.store import BlobStore
from protocol.blob_wire import BlobResponse
from protocol.hashing import chunk_count, chunk_span
from protocol.limits import CHUNK_BYTES


def say(**event) -> None:
    print(json.dumps(event), flush=True)


class MisbehavingServer(BlobServer):
    """The real server, whose range answers can be throttled or stalled."""

    def __init__(self, store: BlobStore, *, stall_after: int | None, rate_mb_s: float | None,
                 trickle_s: float | None = None, cut_after: int | None = None, close_every: int = 0) -> None:
        # a trickler keeps its own streams alive for as long as it likes
        super().__init__(store, **({"request_timeout": 1e6, "idle_timeout": 1e6} if trickle_s else {}))
        self.stall_after, self.rate_mb_s, self.trickle_s, self.cut_after = stall_after, rate_mb_s, trickle_s, cut_after
        # body bytes sent, by stream; weak, so a new stream never inherits a count (an id could be reused)
        self._sent_on: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.body_bytes_sent = 0
        self.close_every, self._streams_seen = close_every, 0

    async def handle_stream(self, info, reader, writer) -> None:
        self._streams_seen += 1
        if self.close_every and self._streams_seen % self.close_every == 0:
            writer.close()  # before reading the request: the downloader gets the stream's end, no byte
            return
        await super().handle_stream(info, reader, writer)

    async def _answer(self, request, writer) -> None:
        if not self.trickle_s:
            return await super()._answer(request, writer)
        if request.op == "digests":
            data = self.store.digest_bytes(request.sha256)
        elif request.op == "has":
            data = b""
        else:
            data = self.store.read_range(request.sha256, request.start, request.end)
        for byte in BlobResponse.ok(len(data)).encode() + data:
            writer.write(bytes([byte]))
            await writer.drain()
            self.body_bytes_sent += 1
            await asyncio.sleep(self.trickle_s)

    async def send_range(self, writer, path, start, end) -> None:
        if self.cut_after is not None:
            return await self._send_until_cut(writer, path, start, end)
        if self.stall_after is None and self.rate_mb_s is None:
            return await super().send_range(writer, path, start, end)
        writer.write(BlobResponse.ok(end - start).encode())
        piece = 256 * 1024
        with open(path, "rb", buffering=0) as source:
            for offset in range(start, end, piece):
                if self.stall_after is not None and self.body_bytes_sent >= self.stall_after:
                    await writer.drain()
                    await asyncio.Event().wait()  # stalled: alive, connected, silent
                data = os.pread(source.fileno(), min(piece, end - offset), offset)
                writer.write(data)
                await writer.drain()
                self.body_bytes_sent += len(data)
                if self.rate_mb_s:
                    await asyncio.sleep(len(data) / (self.rate_mb_s * 1e6))

    async def _send_until_cut(self, writer, path, start, end) -> None:
        sent = self._sent_on.get(writer, 0)
        room = max(0, self.cut_after - sent)
        with open(path, "rb", buffering=0) as source:
            data = os.pread(source.fileno(), min(room, end - start), start)
        writer.write(BlobResponse.ok(end - start).encode() + data)
        await writer.drain()
        self.body_bytes_sent += len(data)
        self._sent_on[writer] = sent + len(data)
        if len(data) < end - start:
            raise ConnectionResetError(f"cut after {self.cut_after} bytes on this stream")  # the server closes it


class ForgingServer(BlobServer):
    """Answers ranges with one byte of each flipped (what a forger on the direct path would send)."""

    async def send_range(self, writer, path, start, end) -> None:
        with open(path, "rb", buffering=0) as source:
            data = bytearray(os.pread(source.fileno(), end - start, start))
        data[0] ^= 0xFF
        writer.write(BlobResponse.ok(end - start).encode() + bytes(data))
        await writer.drain()


def spoil(store: BlobStore, sha256: str, behaviour: str) -> None:
    """Damage this peer's own copy on disk, the way a faulty or malicious peer would hold it."""
    if behaviour == "corrupt":
        size = store.size(sha256)
        with open(store.path(sha256), "r+b") as data:
            for index in range(chunk_count(size)):
                start, _ = chunk_span(index, size)
                data.seek(start + 17)
                byte = data.read(1)
                data.seek(start + 17)
                data.write(bytes([byte[0] ^ 0xFF]))
    elif behaviour == "bad-digests":
        digests = store.path(sha256).with_suffix(".digests")
        raw = bytearray(digests.read_bytes())
        raw[0] ^= 0xFF
        digests.write_bytes(bytes(raw))


async def serve(args: argparse.Namespace) -> None:
    store = BlobStore(args.store)
    ref = store.put_file(args.put)
    spoil(store, ref.sha256, args.behaviour)
    dht = WholeMessageDHT(initial_peers=args.initial_peers or None, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
              nat_port_map=False, auto_nat=False)
    p2p = await dht.replicate_p2p()
    stall_after = args.stall_after_bytes if args.behaviour == "stall" else None
    server = MisbehavingServer(store, stall_after=stall_after, rate_mb_s=args.rate_mb_s,
                               trickle_s=0.7 if args.behaviour == "trickle" else None,
                               cut_after=args.cut_after_bytes if args.behaviour == "cut" else None,
                               close_every=args.close_every)
    await server.start(p2p)
    if args.direct or args.behaviour == "corrupt-direct":
        direct_side = ForgingServer(store) if args.behaviour == "corrupt-direct" else server
        await DirectServer(direct_side, "127.0.0.1").start(p2p)
    say(event="ready", maddrs=[str(m) for m in dht.get_visible_maddrs()], peer_id=p2p.peer_id.to_base58(),
        ref=ref.to_wire(), chunks=chunk_count(ref.size), chunk_bytes=CHUNK_BYTES)
    last = None
    while True:
        stats = dataclasses.asdict(server.stats)
        if stats != last:
            say(event="stats", **stats)
            last = stats
        await asyncio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--put", required=True)
    parser.add_argument("--behaviour", choices=["honest", "corrupt", "bad-digests", "stall", "trickle", "corrupt-direct", "cut"], default="honest")
    parser.add_argument("--stall-after-bytes", type=int, default=8 * CHUNK_BYTES)
    parser.add_argument("--cut-after-bytes", type=int, default=120 * 1024)
    parser.add_argument("--close-every", type=int, default=0)
    parser.add_argument("--rate-mb-s", type=float, default=None)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--direct", action="store_true")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
