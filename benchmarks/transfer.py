"""Blob transfer on loopback: ddm-swarm's fetch_blob against a plain TCP copy of the same file.

    python benchmarks/transfer.py [--size-mib 256] [--repeats 5] [--streams 2]

In one run, the same blob, interleaved repeat by repeat (the machine is shared: medians count):
  (a) fetch_blob from one provider peer (hivemind DHT + p2pd, TLS, separate process),
  (b) fetch_blob from two provider peers at once,
  (c) a plain TCP copy: the sender `sendfile`s the file, the receiver hashes it with sha256 and
      writes it to a file it fsyncs (the durable work fetch_blob does, minus its checks);
and, to show where the time goes:
  (a'), (c') the same as (a) and (c) into a tmpfs (/dev/shm) instead of the disk: this machine's
         disk writes (and fsyncs) ~250 MB/s, which bounds both (a) and (c) on disk;
  (raw)  the same p2p streams with our server and nothing done to the bytes on arrival
         (no chunk hashing, no whole-file hash, no writes): the ceiling set by p2pd.
The CPU seconds of every process involved are sampled from /proc for each transfer: on a machine
shared with other work, CPU per GB is the figure that does not depend on the load.
Prints a rich table and, last, one JSON line with MB/s of each and the ratios (a)/(c), (b)/(c).
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

from hivemind.dht import DHT  # noqa: E402
from hivemind.p2p import PeerID  # noqa: E402

from node.blobs.fetch import FetchReport, fetch_blob  # noqa: E402
from node.blobs.server import BlobServer  # noqa: E402
from node.blobs.stream import StreamReceiver  # noqa: E402
from node.blobs.store import BlobStore  # noqa: E402
from protocol.blob_wire import BLOB_STREAM_PROTOCOL, BlobRequest  # noqa: E402
from protocol.hashing import BlobRef, chunk_span  # noqa: E402

PIECE = 4 << 20


# ---- the processes on the other side -------------------------------------------------------------------
def provider_main(store_dir: str, blob: str) -> None:
    """A provider peer: DHT + BlobServer over the node's own code; prints its address and pids."""
    async def serve() -> None:
        store = BlobStore(store_dir)
        ref = store.put_file(blob)
        dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
        p2p = await dht.replicate_p2p()
        await BlobServer(store).start(p2p)
        print(json.dumps({"maddr": str(dht.get_visible_maddrs()[0]), "peer_id": p2p.peer_id.to_base58(),
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
async def fetch_once(p2p, ref: BlobRef, peers: list[PeerID], store: BlobStore, streams: int) -> float:
    store.delete(ref.sha256)
    report = FetchReport()
    started = time.perf_counter()
    await fetch_blob(p2p, ref, peers, store, streams_per_provider=streams, report=report)
    elapsed = time.perf_counter() - started
    assert not report.banned and report.fetched == ref.num_chunks, report
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


async def measure(args: argparse.Namespace, work: Path) -> dict:
    blob = work / "blob.bin"
    with open(blob, "wb") as out:
        for _ in range(args.size_mib // 4):
            out.write(os.urandom(PIECE))
    size = blob.stat().st_size
    procs, infos = [], []
    try:
        for name in ("p1", "p2"):
            process, info = spawn("provider", str(work / name), str(blob))
            procs.append(process)
            infos.append(info)
        tcp, tcp_info = spawn("tcp-sender", str(blob))
        procs.append(tcp)
        ref = BlobRef(**infos[0]["ref"])
        dht = DHT(initial_peers=[i["maddr"] for i in infos], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                  nat_port_map=False, auto_nat=False)
        p2p = await dht.replicate_p2p()
        peers = [PeerID.from_base58(i["peer_id"]) for i in infos]
        store = BlobStore(work / "fetcher")
        memory = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        memory_store = BlobStore(memory / "fetcher")
        mine = descendants(os.getpid())
        provider_pids = [infos[1]["pids"][0]] + [p for p in infos[1]["pids"] if is_p2pd(p)]
        sampler = CpuSampler({
            "fetcher python": [os.getpid()],
            "fetcher p2pd": [p for p in mine if is_p2pd(p)],
            "provider python": [infos[0]["pids"][0]],
            "provider p2pd": [p for p in infos[0]["pids"] if is_p2pd(p)],
            "second provider": provider_pids,
            "tcp sender": tcp_info["pids"],
        })
        await fetch_once(p2p, ref, peers[:1], store, args.streams)  # warm-up: connections, page cache
        runs = {
            "a": lambda: fetch_once(p2p, ref, peers[:1], store, args.streams),
            "b": lambda: fetch_once(p2p, ref, peers, store, args.streams),
            "c": lambda: asyncio.to_thread(tcp_once, tcp_info["port"], size, work),
            "a-mem": lambda: fetch_once(p2p, ref, peers[:1], memory_store, args.streams),
            "c-mem": lambda: asyncio.to_thread(tcp_once, tcp_info["port"], size, memory),
            "raw": lambda: raw_once(p2p, ref, peers[0], args.streams),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for kind, run in runs.items():  # interleaved, so that load from others hits every kind alike
                sampler.start()
                times[kind].append(await run())
                cpu[kind].append(sampler.stop())
            memory_store.delete(ref.sha256)
        dht.shutdown()
        shutil.rmtree(memory, ignore_errors=True)
    finally:
        for process in procs:
            os.killpg(process.pid, 9)
            process.wait()
    mb_s = {k: [size / t / 1e6 for t in v] for k, v in times.items()}
    per_gb = 1e9 / size
    cpu_a = {k: statistics.median(c[k] for c in cpu["a"]) * per_gb for k in cpu["a"][0] if "fetcher" in k
             or k.startswith("provider")}
    cpu_total = {k: statistics.median(sum(c.values()) for c in v) * per_gb for k, v in cpu.items()}
    return {"size_bytes": size, "repeats": args.repeats, "streams_per_provider": args.streams,
            "mb_s": mb_s, "cpu_s_per_gb_a": cpu_a, "cpu_s_per_gb_total": cpu_total}


def report(result: dict) -> dict:
    from rich.console import Console
    from rich.table import Table

    labels = {"a": "(a) ddm-swarm, 1 provider", "b": "(b) ddm-swarm, 2 providers",
              "c": "(c) TCP sendfile + sha256 + write + fsync", "a-mem": "(a') as (a), into tmpfs",
              "c-mem": "(c') as (c), into tmpfs", "raw": "p2p streams, bytes dropped"}
    median = {k: statistics.median(v) for k, v in result["mb_s"].items()}
    table = Table(title=f"Blob transfer on loopback, {result['size_bytes'] >> 20} MiB, "
                        f"median of {result['repeats']}")
    for column in ("transfer", "MB/s median", "min", "max", "vs (c) / (c')", "CPU s / GB, all processes"):
        table.add_column(column, justify="left" if column == "transfer" else "right")
    for key, label in labels.items():
        values = result["mb_s"][key]
        table.add_row(label, f"{median[key]:.0f}", f"{min(values):.0f}", f"{max(values):.0f}",
                      f"{median[key] / median['c' if key in ('a', 'b', 'c') else 'c-mem']:.2f}",
                      f"{result['cpu_s_per_gb_total'][key]:.2f}")
    console = Console(width=130)
    console.print(table)
    cpu = Table(title="CPU seconds per GB moved in (a), by process")
    cpu.add_column("process")
    cpu.add_column("CPU s / GB", justify="right")
    for name, seconds in result["cpu_s_per_gb_a"].items():
        cpu.add_row(name, f"{seconds:.2f}")
    console.print(cpu)
    return {"mb_s": {k: round(v, 1) for k, v in median.items()},
            "spread_mb_s": {k: [round(min(v)), round(max(v))] for k, v in result["mb_s"].items()},
            "ratio_a_c": round(median["a"] / median["c"], 3), "ratio_b_c": round(median["b"] / median["c"], 3),
            "ratio_a_c_tmpfs": round(median["a-mem"] / median["c-mem"], 3),
            "ratio_raw_c_tmpfs": round(median["raw"] / median["c-mem"], 3),
            "cpu_s_per_gb_a": {k: round(v, 3) for k, v in result["cpu_s_per_gb_a"].items()},
            "cpu_s_per_gb_total": {k: round(v, 3) for k, v in result["cpu_s_per_gb_total"].items()},
            "size_bytes": result["size_bytes"], "repeats": result["repeats"],
            "streams_per_provider": result["streams_per_provider"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--streams", type=int, default=2, help="streams per provider")
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
