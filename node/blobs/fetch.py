"""Download a blob from several providers at once, verifying every chunk, resumable after a crash.

`fetch_blob(p2p, ref, providers, store)`:
0. uses at most `MAX_PROVIDERS` of the providers given (a random sample: anyone can sign provider
   records by the thousand) and opens at most `MAX_OPENING` streams at a time;
1. asks them all at once for the chunk digest list and keeps the first that matches the signed
   `ref.chunks_sha256`. A list that does not match is not proof against its provider (the record
   may be the liar: anyone can sign a record of a made-up blob), so that provider is only dropped
   for this download; when no provider's list matches the record, the record is what is refused
   (`RecordContradicted`);
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
import hashlib
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Awaitable, Callable, Optional, Sequence

from protocol.blob_wire import BlobRequest
from protocol.errors import HashMismatch
from protocol.hashing import DIGEST_BYTES, BlobRef, chunk_span
from protocol.limits import CHUNK_BYTES
from node.blobs.banlist import BanList
from node.blobs.buffers import ChunkBuffers
from node.blobs.direct import DirectRoutes
from node.blobs.outcome import BlobUnavailable, FetchReport, NotProvided, RecordContradicted, ref_key  # noqa: F401 (re-exported)
from node.blobs.partial import PartialDownload
from node.blobs.provider import Provider, ProviderBusy, ProviderFault, ProviderGone, expect_ok, open_stream
from node.blobs.schedule import ChunkScheduler
from node.blobs.stream import StreamClosed, StreamReceiver, StreamStalled
from node.blobs.store import BlobStore

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (verified bytes, total bytes)
Reconnect = Callable[[object], Awaitable[bool]]  # (peer) -> whether a new connection to it was made
MAX_PROVIDERS = 16  # providers one download uses, sampled from those given
MAX_OPENING = 8  # streams being opened at once (each pending open holds a descriptor to the daemon)
MIN_OVERALL_RATE = 256 * 1024  # bytes/s: the whole download's deadline is its size at this rate, plus slack
# A stream cut off part way (a circuit relay ends a relayed connection at its data or time limit; a
# relayed connection is closed once hole punching made a direct one) is followed by a new one, the chunk it was reading resumed where it stopped,
# as long as the cut stream had brought at least this much; a provider closing sooner than that is
# dropped as before. A provider gets at most `MAX_CUTS_PER_MIB` * the blob's MiB (+ 64) new streams.
MIN_RESUMED_BYTES = 16 * 1024
MAX_CUTS_PER_MIB = 16


class _Download:
    def __init__(self, p2p, ref: BlobRef, providers: Sequence[object], partial: PartialDownload, *,
                 bans: BanList, report: FetchReport, progress: Optional[Progress], executor: ThreadPoolExecutor,
                 streams_per_provider: int, stall_timeout: float, min_rate: float, connect_timeout: float,
                 buffers: ChunkBuffers, direct: Optional[DirectRoutes] = None,
                 reconnect: Optional[Reconnect] = None) -> None:
        self.p2p, self.ref, self.partial, self.direct, self.buffers = p2p, ref, partial, direct, buffers
        self.reconnect = reconnect
        self.scope = ref_key(ref)
        self.bans, self.report, self.progress, self.executor = bans, report, progress, executor
        self.streams_per_provider = streams_per_provider
        self.stall_timeout, self.min_rate, self.connect_timeout = stall_timeout, min_rate, connect_timeout
        unique = list(dict.fromkeys(providers))
        random.shuffle(unique)  # which records come first is the attacker's choice
        self.providers = [Provider(peer, peer.to_base58() if hasattr(peer, "to_base58") else str(peer))
                          for peer in unique]
        self.opening = asyncio.Semaphore(MAX_OPENING)
        self.reasons: dict[str, str] = {}
        self.answered: set[str] = set()  # providers that answered "ok" at least once
        self.done_bytes = 0

    async def open(self, provider: Provider) -> StreamReceiver:
        if self.direct is not None:  # the fast path where the provider offers one (see node.blobs.direct)
            stream = await self.direct.open(self.p2p, provider.peer, self.connect_timeout)
            if stream is not None:
                return stream
        async with self.opening:
            try:
                return await open_stream(self.p2p, provider, self.connect_timeout)
            except ProviderGone:
                # A relayed connection that the relay cut is not dialled again by the daemon (it knows
                # no circuit address): `reconnect` does, for providers that answered before.
                if self.reconnect is None or provider.name not in self.answered:
                    raise
                if not await self.reconnect(provider.peer):
                    raise
                return await open_stream(self.p2p, provider, self.connect_timeout)

    # ---- provider bookkeeping --------------------------------------------------------------------------
    def _ban(self, provider: Provider, reason: str) -> None:
        provider.active = False
        if provider.name in self.report.banned:  # a sibling stream already proved it
            return
        self.bans.ban(provider.name, f"blob {self.ref.sha256[:12]}: {reason}", scope=self.scope)
        self.report.banned[provider.name] = reason
        self.reasons[provider.name] = f"banned: {reason}"

    def _drop(self, provider: Provider, reason: str) -> None:
        if provider.active:
            provider.active = False
            logger.info("provider %s dropped for blob %s: %s", provider.name, self.ref.sha256[:12], reason)
        self.report.dropped.setdefault(provider.name, reason)
        self.reasons.setdefault(provider.name, reason)

    def _usable(self) -> list[Provider]:
        for provider in self.providers:
            ban = self.bans.get(provider.name, self.scope)
            if ban is not None and provider.active:
                provider.active = False
                self.reasons[provider.name] = f"banned earlier: {ban.reason}"
        return [provider for provider in self.providers if provider.active]

    def _direct_failed(self, provider: Provider, stream, error: Exception) -> bool:
        """A fault on a direct TCP stream refuses the route, never bans: its bytes are unauthenticated
        (an on-path forger could cause it). The stream's worker then starts over on p2p."""
        if self.direct is None or not self.direct.carried(stream):
            return False
        self.direct.refuse(provider.name, f"{type(error).__name__}: {error}")
        return True

    def _advance(self, chunk_bytes: int) -> None:
        self.done_bytes += chunk_bytes
        if self.progress is not None:
            self.progress(self.done_bytes, self.ref.size)

    def unavailable(self, missing_chunks: int) -> BlobUnavailable:
        kind = BlobUnavailable if self.answered else NotProvided
        return kind(self.ref, self.reasons, missing_chunks)

    # ---- phase 1: the digest list ------------------------------------------------------------------------
    async def _ask_digests(self, provider: Provider, contradicting: list[str]) -> Optional[list[bytes]]:
        expected = DIGEST_BYTES * self.ref.num_chunks
        stream = None
        try:
            stream = await self.open(provider)
            await stream.send(BlobRequest.digests(self.ref.sha256).encode())
            await expect_ok(stream, expected, self.stall_timeout)
            self.answered.add(provider.name)
            raw = bytearray(expected)
            await stream.read_into(raw, self.stall_timeout, self.min_rate)
            digests = [bytes(raw[i:i + DIGEST_BYTES]) for i in range(0, expected, DIGEST_BYTES)]
            try:
                self.ref.check_digest_list(digests)
            except HashMismatch as error:  # the provider or the record lies; one list cannot tell which
                contradicting.append(provider.name)
                self._drop(provider, f"its chunk digest list contradicts the record ({error})")
                return None
            return digests
        except ProviderFault as error:
            self._ban(provider, str(error))
        except (ProviderGone, StreamStalled, StreamClosed, ConnectionError) as error:
            self._drop(provider, str(error))
        finally:
            if stream is not None:
                stream.close()
        return None

    async def obtain_digests(self) -> None:
        """Ask providers for the digest list, `MAX_OPENING` at a time in random order, each failed one
        replaced by the next, until one list matches the record."""
        if self.partial.digests is not None:
            return
        if self.ref.num_chunks == 0:
            await asyncio.to_thread(self.partial.set_digests, [])
            return
        contradicting: list[str] = []
        candidates = iter(self._usable())
        found: list[list[bytes]] = []

        async def asker() -> None:
            while not found and (provider := next(candidates, None)) is not None:
                digests = await self._ask_digests(provider, contradicting)
                if digests is not None and not found:
                    found.append(digests)

        askers = [asyncio.create_task(asker()) for _ in range(MAX_OPENING)]
        try:
            for ask in asyncio.as_completed(askers):
                await ask
                if found:
                    break
        finally:
            for ask in askers:
                ask.cancel()
            await asyncio.gather(*askers, return_exceptions=True)
        if found:
            await asyncio.to_thread(self.partial.set_digests, found[0])
            return
        if contradicting:
            raise RecordContradicted(self.ref, contradicting)
        raise self.unavailable(self.ref.num_chunks)

    def chunk_providers(self) -> list[Provider]:
        """At most `MAX_PROVIDERS` providers for the chunks: those that answered first, then others
        not ruled out yet."""
        usable = self._usable()
        answered = [provider for provider in usable if provider.name in self.answered]
        return (answered + [provider for provider in usable if provider.name not in self.answered])[:MAX_PROVIDERS]

    # ---- phase 2: the chunks -----------------------------------------------------------------------------
    def _verify_and_write(self, index: int, data: bytearray) -> bool:
        """Worker thread: hash a chunk against its digest; write and log it if it matches."""
        if hashlib.sha256(data).digest() != self.partial.digests[index]:
            return False
        self.partial.write_chunk(index, data)
        self.partial.record_verified(index)
        return True

    async def _stream_worker(self, provider: Provider, scheduler: ChunkScheduler) -> bool:
        """One stream to one provider: request chunks (two outstanding), read them, verify the previous
        one on a worker thread while the next arrives. True: its direct route failed, start it again."""
        restart = False
        loop = asyncio.get_running_loop()
        outstanding: list[int] = []  # requested on this stream, answers not read yet, in order
        verifying: Optional[asyncio.Future] = None  # (index, data, matches) of the last chunk read
        stream = None

        def settle(result: tuple[int, bytearray, bool]) -> None:
            index, data, matches = result
            provider.holding.discard(index)
            if not matches:
                self.buffers.give_back(data)
                scheduler.give_back([index])
                raise ProviderFault(f"chunk {index} does not match its digest")
            self.buffers.give_back(data)  # verified and written: nobody reads it any more
            if scheduler.is_done(index):  # endgame: another stream delivered it first
                return
            scheduler.done(index)
            self.report.chunks_fetched[provider.name] = self.report.chunks_fetched.get(provider.name, 0) + 1
            self._advance(len(data))

        def provider_idle() -> bool:
            return not provider.holding

        async def verify(index: int, data: bytearray) -> tuple[int, bytearray, bool]:
            return index, data, await loop.run_in_executor(self.executor, self._verify_and_write, index, data)

        try:
            stream = await self.open(provider)
            while provider.active:
                while len(outstanding) < 2:
                    # Endgame copies only once this provider holds nothing: a copy on one stream of a
                    # provider still sending on another shares that provider's uplink with its own chunk.
                    index = (scheduler.try_take(provider.holding, endgame=provider_idle) if outstanding or verifying
                             else await scheduler.take(provider.holding, endgame=provider_idle))
                    if index is None:
                        break
                    if not provider.active:  # banned by a sibling stream while this one waited
                        scheduler.give_back([index])
                        break
                    outstanding.append(index)
                    provider.holding.add(index)
                    start, end = chunk_span(index, self.ref.size)
                    await stream.send(BlobRequest.range(self.ref.sha256, start, end).encode())
                if verifying is not None and (not outstanding or verifying.done()):
                    pending, verifying = verifying, None
                    settle(await pending)
                if not outstanding:
                    if verifying is None and scheduler.finished:
                        break
                    continue  # nothing to ask for now; wait in take() for chunks other streams give back
                start, end = chunk_span(outstanding[0], self.ref.size)
                await expect_ok(stream, end - start, self.stall_timeout)
                self.answered.add(provider.name)
                data = self.buffers.take(end - start)
                try:
                    await stream.read_into(data, self.stall_timeout, self.min_rate)
                except StreamClosed as cut:
                    if not self._may_resume(provider, stream):
                        raise
                    stream.close()
                    stream = await self._resume_chunk(provider, outstanding[0], data, cut.filled)
                    for later in outstanding[1:]:  # asked on the stream that was cut: ask again
                        await stream.send(BlobRequest.range(self.ref.sha256, *chunk_span(later, self.ref.size)).encode())
                if verifying is not None:
                    pending, verifying = verifying, None
                    settle(await pending)
                verifying = asyncio.ensure_future(verify(outstanding.pop(0), data))
        except ProviderFault as error:
            restart = self._direct_failed(provider, stream, error)
            if not restart:
                self._ban(provider, str(error))
        except ProviderBusy as error:
            self.reasons.setdefault(provider.name, str(error))
        except (ProviderGone, StreamStalled, StreamClosed, ConnectionError) as error:
            restart = self._direct_failed(provider, stream, error)
            if not restart and isinstance(error, StreamClosed) and self._may_resume(provider, stream):
                restart = True  # cut between two answers: a new stream asks again
            if not restart:
                self._drop(provider, str(error))
        finally:
            if verifying is not None:  # a chunk read before the stream failed is still worth keeping
                try:
                    settle(await verifying)
                except ProviderFault as error:
                    if not self._direct_failed(provider, stream, error):
                        self._ban(provider, str(error))
                    else:
                        restart = True
            scheduler.give_back(outstanding)
            provider.holding.difference_update(outstanding)
            if stream is not None:
                stream.close()
        return restart and provider.active

    def _may_resume(self, provider: Provider, stream: Optional[StreamReceiver]) -> bool:
        """Whether a cut `stream` of `provider` is followed by a new one (see `MIN_RESUMED_BYTES`)."""
        if stream is None or stream.received < MIN_RESUMED_BYTES:
            return False
        if self.direct is not None and self.direct.carried(stream):
            return False  # a direct route that fails is refused, never resumed (see `_direct_failed`)
        provider.cuts += 1
        return provider.cuts <= MAX_CUTS_PER_MIB * (self.ref.size >> 20) + 64

    async def _resume_chunk(self, provider: Provider, index: int, data: bytearray, filled: int) -> StreamReceiver:
        """Fetch the rest of chunk `index` (its first `filled` bytes are in `data`) on new streams, each
        asking for the bytes still missing, until all have arrived; return the last stream, with
        nothing asked on it. Over a circuit relay each new stream rides a new circuit once the last
        one was used up. Raises `StreamClosed` once `_may_resume` says no."""
        start, end = chunk_span(index, self.ref.size)
        view = memoryview(data)
        while True:
            stream = await self.open(provider)
            try:
                await stream.send(BlobRequest.range(self.ref.sha256, start + filled, end).encode())
                await expect_ok(stream, end - start - filled, self.stall_timeout)
                await stream.read_into(view[filled:], self.stall_timeout, self.min_rate)
                self.report.pieces_resumed += 1
                return stream
            except StreamClosed as error:
                stream.close()
                if not self._may_resume(provider, stream):
                    raise
                filled += error.filled
                self.report.pieces_resumed += 1
            except BaseException:
                stream.close()
                raise

    async def fetch_chunks(self, missing: list[int]) -> None:
        scheduler = ChunkScheduler(missing)
        workers: dict[asyncio.Task, Provider] = {}
        for provider in self.chunk_providers():
            for _ in range(self.streams_per_provider):
                workers[asyncio.create_task(self._stream_worker(provider, scheduler))] = provider
        try:
            while workers and not scheduler.finished:
                finished, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    provider = workers.pop(task)
                    if task.result():  # (provider errors are caught; anything else is a bug worth seeing)
                        workers[asyncio.create_task(self._stream_worker(provider, scheduler))] = provider
        finally:
            for provider in {id(p): p for p in workers.values()}.values():  # still holding chunks another provider delivered first
                if provider.holding and scheduler.finished:
                    self._drop(provider, "outrun in the endgame: another provider delivered its chunks first")
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if not scheduler.finished:
            raise self.unavailable(scheduler.remaining)


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
    provider answered "ok" at all; `RecordContradicted` (a `HashMismatch`) when every answering
    provider's digest list contradicts the ref; `DownloadInProgress` if another fetch of this ref into this store is running.
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
    download = _Download(p2p, ref, providers, partial, bans=bans if bans is not None else BanList(), report=report,
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
    except (BlobUnavailable, RecordContradicted):
        if partial.digests is None:  # nothing worth resuming: leave no partial behind
            await asyncio.to_thread(partial.discard)
        raise
    finally:
        # Threads may still be writing or hashing a chunk: let them finish before the files close
        # (a closed descriptor's number can be reused at once, by an unrelated file).
        await asyncio.to_thread(executor.shutdown)
        partial.close()
        report.seconds = time.perf_counter() - started


async def _run(download: _Download, partial: PartialDownload) -> Path:
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
