"""Download a blob from several providers at once, verifying every chunk, resumable after a crash.

`fetch_blob(p2p, ref, providers, store)`:
0. uses at most `MAX_PROVIDERS` of the providers given (a random sample: anyone can sign provider
   records by the thousand) and opens at most `MAX_OPENING` streams at a time;
1. asks them all at once for the chunk digest list and keeps the first that matches the signed
   `ref.chunks_sha256`. The blob's id is the root of that list (`protocol.hashing`, protocol 4), so
   no honest holder of the blob has another list: a provider whose list does not match is banned
   for this reference (before protocol 4 a record could be the liar, and such a provider was only
   dropped);
2. only then reserves disk space, and re-checks the chunks a killed earlier run had verified;
3. runs `streams_per_provider` streams to every provider; each stream asks for chunk after chunk
   (two requests outstanding, so the provider never waits for us), every chunk is hashed against
   its digest on a worker thread, written at its offset and logged as verified; at the end, the
   streams of a provider that holds nothing more ask again for chunks still in flight elsewhere
   (endgame), so one slow provider cannot hold the last chunk; a chunk whose stream is cut part
   way (a circuit relay's data limit) is resumed from where it stopped on a new stream;
4. bans a provider whose bytes contradict the digest list, for this reference only (see
   `node.blobs.banlist`), and gives its chunks to the others; drops a provider that stalls,
   trickles (every header, digest list and chunk has a deadline and a minimum rate), vanishes or
   is busy, likewise; the whole download has a deadline too;
5. moves the file into the store once every chunk is verified: the blob's id is the root of its
   digest list (`protocol.hashing`), so the verified chunks are the whole check, one sha256 pass
   over the bytes.

`NotProvided` (a `BlobUnavailable`) says that no provider even answered "ok": the blob is not
provided at all, whatever the DHT's provider records say.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from protocol.hashing import BlobRef, chunk_span
from protocol.limits import CHUNK_BYTES
from node.blobs.banlist import BanList
from node.blobs.buffers import ChunkBuffers
from node.blobs.direct import DirectRoutes
from node.blobs.download import MAX_PROVIDERS, Download, Progress, Reconnect  # noqa: F401 (re-exported)
from node.blobs.outcome import BlobUnavailable, FetchReport, NotProvided  # noqa: F401 (re-exported)
from node.blobs.partial import PartialDownload
from node.blobs.store import BlobStore

MIN_OVERALL_RATE = 256 * 1024  # bytes/s: the whole download's deadline is its size at this rate, plus slack


async def fetch_blob(p2p, ref: BlobRef, providers: Sequence[object], store: BlobStore, *,
                     bans: Optional[BanList] = None, progress: Optional[Progress] = None,
                     report: Optional[FetchReport] = None, streams_per_provider: int = 2,
                     stall_timeout: float = 10.0, min_rate: float = 64 * 1024,
                     connect_timeout: float = 15.0, deadline_s: Optional[float] = None,
                     direct: Optional[DirectRoutes] = None, reconnect: Optional[Reconnect] = None) -> Path:
    """Fetch blob `ref` from `providers` (hivemind `PeerID`s) into `store`; return its path there.

    `ref` must come from a signed record: every chunk is checked against the digest list, the list
    against `ref.chunks_sha256` (which `ref.sha256`, the blob's id, binds). A provider that sends bytes contradicting the digest list is
    added to `bans` for this reference (and skipped while banned); one that sends nothing for
    `stall_timeout` seconds, takes longer than that for a response header, or delivers a chunk or
    the digest list slower than `min_rate` bytes/s, is dropped for this download; their chunks go
    to the others. The whole call gives up after `deadline_s` seconds (default: `connect_timeout
    + 2 * stall_timeout + size / MIN_OVERALL_RATE`). `progress(verified_bytes, total_bytes)` is
    called as chunks are verified; `report` (if given) is filled in as the download runs. With
    `direct`, chunks travel over direct TCP where a provider offers it (`node.blobs.direct`),
    verified alike, with p2p as the fallback. `reconnect(peer)`, if given, makes a new connection to
    a provider that answered before and can no longer be reached (through a circuit relay, whose
    connections end at the relay's data limit: `node.blobs.service`).

    Raises `BlobUnavailable` naming every provider and why it failed (the partial download is
    kept once its digest list was obtained: a later call resumes it), `NotProvided` when no
    provider answered "ok" at all (a provider whose digest list contradicts the ref is banned and
    named among them); `DownloadInProgress` if another fetch of this ref into this store is running.
    """
    started = time.perf_counter()
    report = report if report is not None else FetchReport()
    report.chunks_total = ref.num_chunks
    if store.has(ref.sha256):
        return store.path(ref.sha256)
    if deadline_s is None:
        deadline_s = connect_timeout + 2 * stall_timeout + ref.size / MIN_OVERALL_RATE
    partial = await asyncio.to_thread(PartialDownload, store, ref)
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"blob-{ref.sha256[:8]}")
    buffers = ChunkBuffers(CHUNK_BYTES)
    download = Download(p2p, ref, providers, partial, bans=bans if bans is not None else BanList(), report=report,
                         progress=progress, executor=executor, streams_per_provider=streams_per_provider,
                         stall_timeout=stall_timeout, min_rate=min_rate, connect_timeout=connect_timeout,
                         buffers=buffers, direct=direct, reconnect=reconnect)
    try:
        try:
            async with asyncio.timeout(deadline_s):
                return await _run(download, partial)
        except TimeoutError:
            download.reasons["(download)"] = f"did not finish within its deadline of {deadline_s:.0f} s"
            raise download.unavailable(ref.num_chunks - len(download.report.chunks_fetched)) from None
    except BlobUnavailable:
        if partial.digests is None:  # nothing worth resuming: leave no partial behind
            await asyncio.to_thread(partial.discard)
        raise
    finally:
        # Threads may still be writing or hashing a chunk: let them finish before the files close
        # (a closed descriptor's number can be reused at once, by an unrelated file).
        await asyncio.to_thread(executor.shutdown)
        partial.close()
        report.seconds = time.perf_counter() - started


async def _run(download: Download, partial: PartialDownload) -> Path:
    ref, report, progress = download.ref, download.report, download.progress
    await download.obtain_digests()
    resumed = await asyncio.to_thread(partial.recheck, partial.logged_chunks())
    report.chunks_resumed = len(resumed)
    for index in resumed:
        start, end = chunk_span(index, ref.size)
        download.done_bytes += end - start
    if progress is not None:
        progress(download.done_bytes, ref.size)
    missing = sorted(set(range(ref.num_chunks)) - set(resumed))
    await download.fetch_chunks(missing)
    return await asyncio.to_thread(partial.complete)
