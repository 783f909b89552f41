"""Blob transfer on loopback: ddm-swarm's fetch_blob against a plain TCP copy of the same file.

    python benchmarks/transfer.py [--size-mib 256] [--repeats 5] [--streams 2] [--limit-mb-s 40]

In one run, the same blob, interleaved repeat by repeat (the machine is shared: medians count):
  (a) fetch_blob from one provider peer over p2p streams only (hivemind DHT + p2pd, TLS),
  (d) fetch_blob from one provider over its direct TCP port (node.blobs.direct; digests over p2p,
      every chunk verified alike),
  (b) fetch_blob from two provider peers at once (direct),
  (t1), (t2) one and two providers whose sending is throttled to --limit-mb-s each (a token bucket
      in the provider), the case where a second provider must help: target (t2)/(t1) >= 1.7,
  (c) a plain TCP copy: the sender `sendfile`s the file, the receiver hashes it with sha256 and
      writes it to a file it fsyncs (the durable work fetch_blob does, minus its checks);
and, to show where the time goes:
  (a'), (d'), (c') the same as (a), (d) and (c) into a tmpfs (/dev/shm) instead of the disk: this machine's
         disk writes (and fsyncs) ~250 MB/s, which bounds both (a) and (c) on disk;
  (raw)  the same p2p streams with our server and nothing done to the bytes on arrival
         (no chunk hashing, no whole-file hash, no writes): the ceiling set by p2pd.
The CPU seconds of every process involved are sampled from /proc for each transfer: on a machine
shared with other work, CPU per GB is the figure that does not depend on the load.
  (relay) fetch_blob from a provider that listens nowhere and is reached through a p2pd circuit
          relay (a third peer), measured separately (--relay-mib of it, circuits are slow by design):
          once by the fetcher above (hole punching may turn the connection direct) and once by a
          fetcher that listens nowhere either (every byte through the relay's circuits).
Prints a rich table and, last, one JSON line with MB/s of each and the ratios (a)/(c), (b)/(c), ...
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.swarm.membership import WholeMessageDHT  # noqa: E402
from hivemind.p2p import PeerID  # noqa: E402

from node.blobs.direct import DirectRoutes, DirectServer  # noqa: E402
from node.blobs.fetch import FetchReport, fetch_blob  # noqa: E402
from node.blobs.server import BlobServer  # noqa: E402
from node.blobs.stream import StreamReceiver  # noqa: E402
from node.blobs.store import BlobStore  # noqa: E402
from node.swarm.reachability import dial_through_relay, extra_p2pd_flags  # noqa: E402
from protocol.blob_wire import BLOB_STREAM_PROTOCOL, BlobRequest  # noqa: E402
from protocol.hashing import BlobRef, chunk_span  # noqa: E402

PIECE = 4 << 20


# ---- the processes on the other side -------------------------------------------------------------------
class ThrottledServer(BlobServer):
    """A BlobServer whose whole sending is held to `rate` bytes/s by one token bucket (all streams,
    p2p and direct together): a provider on a slow uplink."""

    PIECE = 256 * 1024

    def __init__(self, store: BlobStore, rate: float) -> None:
        super().__init__(store)
        self.rate, self._tokens, self._at = rate, 0.0, time.monotonic()

    async def _take(self, count: int) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self.rate * 0.1, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= count:
                self._tokens -= count
                return
            await asyncio.sleep((count - self._tokens) / self.rate)

    async def send_range(self, writer, path, start, end) -> None:
        from protocol.blob_wire import BlobResponse
        loop = asyncio.get_running_loop()
        with open(path, "rb", buffering=0) as source:
            writer.write(BlobResponse.ok(end - start).encode())
            while start < end:
                count = min(self.PIECE, end - start)
                await self._take(count)
                await loop.sendfile(writer.transport, source, start, count)
                start += count


def provider_main(store_dir: str, blob: str, rate_mb_s: str = "0", relay: str = "") -> None:
    """A provider peer: DHT + BlobServer (+ its direct port) over the node's own code; prints its
    address and pids. With `relay`, it listens nowhere and is reachable only through that relay."""
    async def serve() -> None:
        store = BlobStore(store_dir)
        ref = store.put_file(blob)
        if relay:  # a bare libp2p host; a static relay reserves at once (node.swarm.reachability.p2p_options)
            from hivemind.p2p import P2P
            with extra_p2pd_flags({"relayDiscovery": False}):
                p2p = await P2P.create(initial_peers=[relay], no_listen=True, use_auto_relay=True,
                                       force_reachability="private", trusted_relays=[relay], nat_port_map=False,
                                       auto_nat=False)
        else:
            dht = WholeMessageDHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
            p2p = await dht.replicate_p2p()
        server = ThrottledServer(store, float(rate_mb_s) * 1e6) if float(rate_mb_s) > 0 else BlobServer(store)
        await server.start(p2p)
        if not relay:
            await DirectServer(server, "127.0.0.1").start(p2p)
        maddrs = [""] if relay else [str(m) for m in dht.get_visible_maddrs()]
        print(json.dumps({"maddr": maddrs[0], "peer_id": p2p.peer_id.to_base58(),
                          "ref": ref.to_wire(), "pids": descendants(os.getpid())}), flush=True)
        await asyncio.Event().wait()
    asyncio.run(serve())


def tcp_sender_main(blob: str) -> None:
    """Plain TCP: send the whole file with sendfile to every connection."""
    server = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"port": server.getsockname()[1], "pids": [os.getpid()]}), flush=True)
    size = os.path.getsize(blob)
    while True:
        connection, _ = server.accept()
        with connection, open(blob, "rb") as source:
            offset = 0
            while offset < size:
                offset += os.sendfile(connection.fileno(), source.fileno(), offset, size - offset)


def spawn(role: str, *args: str) -> tuple[subprocess.Popen, dict]:
    process = subprocess.Popen([sys.executable, __file__, "--role", role, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)},
                               start_new_session=True)
    return process, json.loads(process.stdout.readline())


# ---- CPU accounting ------------------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def is_p2pd(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"p2pd" in cmdline.read().split(b"\0")[0]
    except OSError:
        return False


class CpuSampler:
    """CPU seconds used by named groups of processes between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups

    def start(self) -> None:
        self._before = {name: sum(map(cpu_seconds, pids)) for name, pids in self.groups.items()}

    def stop(self) -> dict[str, float]:
        return {name: sum(map(cpu_seconds, pids)) - self._before[name] for name, pids in self.groups.items()}


# ---- the transfers -------------------------------------------------------------------------------------
async def fetch_once(p2p, ref: BlobRef, peers: list[PeerID], store: BlobStore, streams: int,
                     direct: bool = False, reconnect=None) -> float:
    store.delete(ref.sha256)
    report, routes = FetchReport(), DirectRoutes() if direct else None
    started = time.perf_counter()
    await fetch_blob(p2p, ref, peers, store, streams_per_provider=streams, report=report, direct=routes,
                     stall_timeout=60.0, min_rate=1.0, reconnect=reconnect)
    elapsed = time.perf_counter() - started
    assert not report.banned and report.fetched == ref.num_chunks, report
    assert not direct or (routes.opened and not routes.refusals), routes.refusals  # really went direct
    return elapsed


async def raw_once(p2p, ref: BlobRef, peer: PeerID, streams: int) -> float:
    """The blob's chunks over `streams` streams from our server, bytes dropped on arrival."""
    indices = list(range(ref.num_chunks))

    async def worker() -> None:
        stream = StreamReceiver(*(await p2p.call_binary_stream_handler(peer, BLOB_STREAM_PROTOCOL))[1:])
        while indices:
            start, end = chunk_span(indices.pop(), ref.size)
            await stream.send(BlobRequest.range(ref.sha256, start, end).encode())
            header = await stream.read_response(10)
            await stream.read_into(bytearray(header.length), 10)
        stream.close()

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(streams)])
    return time.perf_counter() - started


def tcp_once(port: int, size: int, sink_dir: Path) -> float:
    started = time.perf_counter()
    digest = hashlib.sha256()
    buffer = bytearray(PIECE)
    view = memoryview(buffer)
    received = 0
    with socket.create_connection(("127.0.0.1", port)) as connection, \
            tempfile.NamedTemporaryFile(dir=sink_dir) as sink:
        while received < size:
            count = connection.recv_into(view)
            if not count:
                break
            digest.update(view[:count])
            os.write(sink.fileno(), view[:count])
            received += count
        os.fsync(sink.fileno())
    assert received == size
    return time.perf_counter() - started


def write_blob(path: Path, mib: int) -> None:
    with open(path, "wb") as out:
        for _ in range(max(1, mib // 4)):
            out.write(os.urandom(PIECE))


async def measure(args: argparse.Namespace, work: Path) -> dict:
    blob = work / "blob.bin"
    write_blob(blob, args.size_mib)
    size = blob.stat().st_size
    procs, infos = [], []
    try:
        for name, rate in (("p1", 0), ("p2", 0), ("t1", args.limit_mb_s), ("t2", args.limit_mb_s)):
            process, info = spawn("provider", str(work / name), str(blob), str(rate))
            procs.append(process)
            infos.append(info)
        tcp, tcp_info = spawn("tcp-sender", str(blob))
        procs.append(tcp)
        ref = BlobRef(**infos[0]["ref"])
        dht = WholeMessageDHT(initial_peers=[i["maddr"] for i in infos], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                  nat_port_map=False, auto_nat=False)
        p2p = await dht.replicate_p2p()
        peers = [PeerID.from_base58(i["peer_id"]) for i in infos]
        store = BlobStore(work / "fetcher")
        memory = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        memory_store = BlobStore(memory / "fetcher")
        mine = descendants(os.getpid())
        sampler = CpuSampler({
            "fetcher python": [os.getpid()],
            "fetcher p2pd": [p for p in mine if is_p2pd(p)],
            "provider python": [infos[0]["pids"][0]],
            "provider p2pd": [p for p in infos[0]["pids"] if is_p2pd(p)],
            "other providers": [p for info in infos[1:] for p in info["pids"]],
            "tcp sender": tcp_info["pids"],
        })
        await fetch_once(p2p, ref, peers[:1], store, args.streams)  # warm-up: connections, page cache
        runs = {
            "a": lambda: fetch_once(p2p, ref, peers[:1], store, args.streams),
            "d": lambda: fetch_once(p2p, ref, peers[:1], store, args.streams, direct=True),
            "b": lambda: fetch_once(p2p, ref, peers[:2], store, args.streams, direct=True),
            "c": lambda: asyncio.to_thread(tcp_once, tcp_info["port"], size, work),
            "a-mem": lambda: fetch_once(p2p, ref, peers[:1], memory_store, args.streams),
            "d-mem": lambda: fetch_once(p2p, ref, peers[:1], memory_store, args.streams, direct=True),
            "c-mem": lambda: asyncio.to_thread(tcp_once, tcp_info["port"], size, memory),
            "raw": lambda: raw_once(p2p, ref, peers[0], args.streams),
            "t1": lambda: fetch_once(p2p, ref, peers[2:3], memory_store, args.streams, direct=True),
            "t2": lambda: fetch_once(p2p, ref, peers[2:4], memory_store, args.streams, direct=True),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for kind, run in runs.items():  # interleaved, so that load from others hits every kind alike
                sampler.start()
                times[kind].append(await run())
                cpu[kind].append(sampler.stop())
                memory_store.delete(ref.sha256)
        relay_mb_s = await measure_relay(args, work, p2p, memory_store) if args.relay_mib else None
        dht.shutdown()
        shutil.rmtree(memory, ignore_errors=True)
    finally:
        for process in procs:
            os.killpg(process.pid, 9)
            process.wait()
    mb_s = {k: [size / t / 1e6 for t in v] for k, v in times.items()}
    per_gb = 1e9 / size
    cpu_by_process = {kind: {k: statistics.median(c[k] for c in cpu[kind]) * per_gb for k in cpu[kind][0]
                             if "fetcher" in k or k.startswith("provider")} for kind in ("a", "d", "d-mem")}
    cpu_total = {k: statistics.median(sum(c.values()) for c in v) * per_gb for k, v in cpu.items()}
    return {"size_bytes": size, "repeats": args.repeats, "streams_per_provider": args.streams,
            "limit_mb_s": args.limit_mb_s, "relay_mb_s": relay_mb_s,
            "mb_s": mb_s, "cpu_s_per_gb_by_process": cpu_by_process, "cpu_s_per_gb_total": cpu_total}


async def measure_relay(args: argparse.Namespace, work: Path, p2p, store: BlobStore) -> dict:
    """A blob fetched from a provider that listens nowhere, through a p2pd circuit relay."""
    from hivemind.p2p import P2P

    blob = work / "relay-blob.bin"
    write_blob(blob, args.relay_mib)
    relay = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], force_reachability="public",
                             nat_port_map=False, auto_nat=False)
    process = None
    try:
        relay_maddr = str((await relay.get_visible_maddrs())[0])
        started = time.perf_counter()
        process, info = spawn("provider", str(work / "hidden"), str(blob), "0", relay_maddr)
        peer = PeerID.from_base58(info["peer_id"])
        for _ in range(120):  # the hidden provider reserves a slot on the relay after it starts
            if await dial_through_relay(p2p, peer, relay_maddr):
                break
            await asyncio.sleep(0.5)
        else:
            return {"error": "the hidden provider could not be reached through the relay in 60 s"}
        reached_s = time.perf_counter() - started
        ref = BlobRef(**info["ref"])
        redial = lambda peer, on=p2p: dial_through_relay(on, peer, relay_maddr)  # noqa: E731
        seconds = await fetch_once(p2p, ref, [peer], store, args.streams, reconnect=redial)
        store.delete(ref.sha256)
        via = [str(a) for i in await p2p.list_peers() if i.peer_id == peer for a in i.addrs]
        # Relay only: a fetcher that listens nowhere either, so hole punching has no side to dial and
        # every byte crosses the relay (a circuit cut at a limit is dialled again, its chunk resumed).
        with extra_p2pd_flags({"relayDiscovery": False}):
            hidden = await P2P.create(initial_peers=[relay_maddr], no_listen=True, force_reachability="private",
                                      nat_port_map=False, auto_nat=False)
        try:
            if not await dial_through_relay(hidden, peer, relay_maddr):
                return {"error": "the listen-nowhere fetcher could not reach the provider through the relay"}
            report = FetchReport()
            started = time.perf_counter()
            await fetch_blob(hidden, ref, [peer], store, streams_per_provider=args.streams, report=report,
                             stall_timeout=60.0, reconnect=lambda peer: dial_through_relay(hidden, peer, relay_maddr))
            relay_only_s = time.perf_counter() - started
            store.delete(ref.sha256)
            relay_only_via = [str(a) for i in await hidden.list_peers() if i.peer_id == peer for a in i.addrs]
        finally:
            await hidden.shutdown()
        return {"mb_s": round(blob.stat().st_size / seconds / 1e6, 1), "size_bytes": blob.stat().st_size,
                "reached_through_relay_s": round(reached_s, 2), "connection": via,
                "relay_only_mb_s": round(blob.stat().st_size / relay_only_s / 1e6, 2),
                "relay_only_pieces_resumed": report.pieces_resumed, "relay_only_connection": relay_only_via}
    finally:
        if process is not None:
            os.killpg(process.pid, 9)
            process.wait()
        await relay.shutdown()


def report(result: dict) -> dict:
    from rich.console import Console
    from rich.table import Table

    labels = {"a": "(a) ddm-swarm, 1 provider, p2p only", "d": "(d) ddm-swarm, 1 provider, direct TCP",
              "b": "(b) ddm-swarm, 2 providers, direct", "c": "(c) TCP sendfile + sha256 + write + fsync",
              "a-mem": "(a') as (a), into tmpfs", "d-mem": "(d') as (d), into tmpfs", "c-mem": "(c') as (c), into tmpfs",
              "raw": "p2p streams, bytes dropped", "t1": "(t1) 1 throttled provider, tmpfs",
              "t2": "(t2) 2 throttled providers, tmpfs"}
    median = {k: statistics.median(v) for k, v in result["mb_s"].items()}
    on_disk = ("a", "d", "b", "c")
    table = Table(title=f"Blob transfer on loopback, {result['size_bytes'] >> 20} MiB, "
                        f"median of {result['repeats']}, throttle {result['limit_mb_s']} MB/s per provider in (t)")
    for column in ("transfer", "MB/s median", "min", "max", "vs (c) / (c')", "CPU s / GB, all processes"):
        table.add_column(column, justify="left" if column == "transfer" else "right")
    for key, label in labels.items():
        values = result["mb_s"][key]
        table.add_row(label, f"{median[key]:.0f}", f"{min(values):.0f}", f"{max(values):.0f}",
                      f"{median[key] / median['c' if key in on_disk else 'c-mem']:.2f}",
                      f"{result['cpu_s_per_gb_total'][key]:.2f}")
    console = Console(width=130)
    console.print(table)
    for kind, by_process in result["cpu_s_per_gb_by_process"].items():
        cpu = Table(title=f"CPU seconds per GB moved in ({kind}), by process")
        cpu.add_column("process")
        cpu.add_column("CPU s / GB", justify="right")
        for name, seconds in by_process.items():
            cpu.add_row(name, f"{seconds:.2f}")
        console.print(cpu)
    total = result["cpu_s_per_gb_total"]
    return {"mb_s": {k: round(v, 1) for k, v in median.items()},
            "spread_mb_s": {k: [round(min(v)), round(max(v))] for k, v in result["mb_s"].items()},
            "ratio_a_c": round(median["a"] / median["c"], 3), "ratio_d_c": round(median["d"] / median["c"], 3),
            "ratio_b_c": round(median["b"] / median["c"], 3),
            "ratio_a_c_tmpfs": round(median["a-mem"] / median["c-mem"], 3),
            "ratio_d_c_tmpfs": round(median["d-mem"] / median["c-mem"], 3),
            "ratio_raw_c_tmpfs": round(median["raw"] / median["c-mem"], 3),
            "ratio_t2_t1": round(median["t2"] / median["t1"], 3),
            "cpu_ratio_a_c_tmpfs": round(total["a-mem"] / total["c-mem"], 3),
            "cpu_ratio_d_c_tmpfs": round(total["d-mem"] / total["c-mem"], 3),
            "relay": result["relay_mb_s"],
            "cpu_s_per_gb_by_process": {kind: {k: round(v, 3) for k, v in d.items()}
                                        for kind, d in result["cpu_s_per_gb_by_process"].items()},
            "cpu_s_per_gb_total": {k: round(v, 3) for k, v in total.items()},
            "size_bytes": result["size_bytes"], "repeats": result["repeats"], "limit_mb_s": result["limit_mb_s"],
            "streams_per_provider": result["streams_per_provider"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--streams", type=int, default=2, help="streams per provider")
    parser.add_argument("--limit-mb-s", type=float, default=10.0, help="per-provider throttle in (t1), (t2)")
    parser.add_argument("--relay-mib", type=int, default=32, help="size of the blob fetched through a relay (0: skip)")
    parser.add_argument("--role", choices=["provider", "tcp-sender"], help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "provider":
        return provider_main(*args.role_args)
    if args.role == "tcp-sender":
        return tcp_sender_main(*args.role_args)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as work:
        result = asyncio.run(measure(args, Path(work)))
    print(json.dumps(report(result)))


if __name__ == "__main__":
    main()
