"""Download a blob from several providers at once, verifying every chunk, resumable after a crash.

`fetch_blob(p2p, ref, providers, store)`:
1. asks providers for the chunk digest list and checks it against the signed `ref.chunks_sha256`;
2. re-checks the chunks a killed earlier run had verified (they are not fetched again);
3. runs `streams_per_provider` streams to every provider; each stream asks for chunk after chunk
   (two requests outstanding, so the provider never waits for us), every chunk is hashed against
   its digest on a worker thread, written at its offset and logged as verified;
4. bans a provider whose bytes or digest list are wrong and gives its chunks to the others; drops
   a provider that stalls, vanishes or is busy, likewise;
5. hashes the whole file in order while chunks arrive, and moves it into the store only when it
   matches `ref.sha256`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from protocol.blob_wire import BLOB_STREAM_PROTOCOL, BlobRequest
from protocol.errors import HashMismatch, InvalidBlobResponse
from protocol.hashing import DIGEST_BYTES, BlobRef, chunk_span
from node.blobs.banlist import BanList
from node.blobs.direct import DirectRoutes
from node.blobs.partial import PartialDownload
from node.blobs.schedule import ChunkScheduler, OrderedHasher
from node.blobs.stream import StreamClosed, StreamReceiver, StreamStalled
from node.blobs.store import BlobStore
from node.errors import NodeError

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (verified bytes, total bytes)


class BlobUnavailable(NodeError):
    """No provider could deliver a blob. `reasons` maps each provider tried to why it failed."""

    def __init__(self, ref: BlobRef, reasons: dict[str, str], missing_chunks: int) -> None:
        self.ref, self.reasons, self.missing_chunks = ref, dict(reasons), missing_chunks
        listing = "; ".join(f"{peer}: {why}" for peer, why in reasons.items()) or "no providers were given"
        super().__init__(f"blob {ref.sha256[:12]} ({ref.size} bytes): {missing_chunks} chunks still missing and no "
                         f"provider can deliver them ({listing}). The partial download is kept; retry with other "
                         f"providers.")


class ProviderFault(Exception):
    """A provider proved itself dishonest (bad bytes, bad digest list, malformed answer): ban it."""


class ProviderGone(Exception):
    """A provider stalled, vanished or lacks the blob: stop using it for this download."""


class ProviderBusy(ProviderGone):
    """A provider has no stream to spare: this stream gives up, the provider's other streams go on."""


@dataclass
class FetchReport:
    """What one `fetch_blob` call did; filled in as it runs."""

    chunks_total: int = 0
    chunks_resumed: int = 0
    chunks_fetched: dict[str, int] = field(default_factory=dict)
    banned: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def fetched(self) -> int:
        return sum(self.chunks_fetched.values())


@dataclass
class _Provider:
    peer: object  # hivemind PeerID
    name: str
    active: bool = True


async def _open(p2p, provider: _Provider, timeout: float, direct: Optional[DirectRoutes] = None):
    if direct is not None:  # the fast path where the provider offers one (see node.blobs.direct)
        stream = await direct.open(p2p, provider.peer, timeout)
        if stream is not None:
            return stream
    try:
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(provider.peer, BLOB_STREAM_PROTOCOL),
                                                   timeout)
    except asyncio.TimeoutError:
        raise ProviderGone(f"no stream within {timeout:.0f} s") from None
    except Exception as error:  # p2pd reports unreachable peers with several exception types
        raise ProviderGone(f"cannot open a stream: {type(error).__name__}: {error}") from None
    return StreamReceiver(reader, writer)


async def _expect_ok(stream: StreamReceiver, expected_length: int, timeout: float) -> None:
    try:
        header = await stream.read_response(timeout)
    except InvalidBlobResponse as error:
        raise ProviderFault(f"malformed answer: {error}") from None
    if header.status == "ok" and header.length != expected_length:
        raise ProviderFault(f"answered {header.length} bytes where {expected_length} were asked for")
    if header.status == "busy":
        raise ProviderBusy(f"busy: {header.detail}")
    if header.status != "ok":
        raise ProviderGone(f"answered '{header.status}': {header.detail}")


class _Download:
    def __init__(self, p2p, ref: BlobRef, providers: Sequence[object], partial: PartialDownload, *,
                 bans: BanList, report: FetchReport, progress: Optional[Progress], executor: ThreadPoolExecutor,
                 streams_per_provider: int, stall_timeout: float, min_rate: float, connect_timeout: float,
                 direct: Optional[DirectRoutes] = None) -> None:
        self.p2p, self.ref, self.partial, self.direct = p2p, ref, partial, direct
        self.bans, self.report, self.progress, self.executor = bans, report, progress, executor
        self.streams_per_provider = streams_per_provider
        self.stall_timeout, self.min_rate, self.connect_timeout = stall_timeout, min_rate, connect_timeout
        self.providers = [_Provider(peer, peer.to_base58() if hasattr(peer, "to_base58") else str(peer))
                          for peer in dict.fromkeys(providers)]
        self.reasons: dict[str, str] = {}
        self.done_bytes = 0

    # ---- provider bookkeeping --------------------------------------------------------------------------
    def _ban(self, provider: _Provider, reason: str) -> None:
        provider.active = False
        if provider.name in self.report.banned:  # a sibling stream already proved it
            return
        self.bans.ban(provider.name, f"blob {self.ref.sha256[:12]}: {reason}")
        self.report.banned[provider.name] = reason
        self.reasons[provider.name] = f"banned: {reason}"

    def _drop(self, provider: _Provider, reason: str) -> None:
        if provider.active:
            provider.active = False
            logger.info("provider %s dropped for blob %s: %s", provider.name, self.ref.sha256[:12], reason)
        self.report.dropped.setdefault(provider.name, reason)
        self.reasons.setdefault(provider.name, reason)

    def _usable(self) -> list[_Provider]:
        for provider in self.providers:
            ban = self.bans.get(provider.name)
            if ban is not None and provider.active:
                provider.active = False
                self.reasons[provider.name] = f"banned earlier: {ban.reason}"
        return [provider for provider in self.providers if provider.active]

    def _direct_failed(self, provider: _Provider, stream, error: Exception) -> bool:
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

    # ---- phase 1: the digest list ------------------------------------------------------------------------
    async def obtain_digests(self) -> None:
        if self.partial.digests is not None:
            return
        if self.ref.num_chunks == 0:
            self.partial.set_digests([])
            return
        expected = DIGEST_BYTES * self.ref.num_chunks
        for provider in self._usable():
            stream = None
            try:
                stream = await _open(self.p2p, provider, self.connect_timeout)
                await stream.send(BlobRequest.digests(self.ref.sha256).encode())
                await _expect_ok(stream, expected, self.stall_timeout)
                raw = bytearray(expected)
                await stream.read_into(raw, self.stall_timeout)
                digests = [bytes(raw[i:i + DIGEST_BYTES]) for i in range(0, expected, DIGEST_BYTES)]
                try:
                    self.ref.check_digest_list(digests)
                except HashMismatch as error:
                    raise ProviderFault(f"sent a wrong chunk digest list ({error})") from None
                await asyncio.to_thread(self.partial.set_digests, digests)
                return
            except ProviderFault as error:
                self._ban(provider, str(error))
            except (ProviderGone, StreamStalled, StreamClosed, ConnectionError) as error:
                self._drop(provider, str(error))
            finally:
                if stream is not None:
                    stream.close()
        raise BlobUnavailable(self.ref, self.reasons, self.ref.num_chunks)

    # ---- phase 2: the chunks -----------------------------------------------------------------------------
    def _verify_and_write(self, index: int, data: bytearray) -> bool:
        """Worker thread: hash a chunk against its digest; write and log it if it matches."""
        if hashlib.sha256(data).digest() != self.partial.digests[index]:
            return False
        self.partial.write_chunk(index, data)
        self.partial.record_verified(index)
        return True

    async def _stream_worker(self, provider: _Provider, scheduler: ChunkScheduler, hasher: OrderedHasher) -> bool:
        """One stream to one provider: request chunks (two outstanding), read them, verify the previous
        one on a worker thread while the next arrives. True: its direct route failed, start it again."""
        restart = False
        loop = asyncio.get_running_loop()
        outstanding: list[int] = []  # requested on this stream, answers not read yet, in order
        verifying: Optional[asyncio.Future] = None  # (index, data, matches) of the last chunk read
        stream = None

        def settle(result: tuple[int, bytearray, bool]) -> None:
            index, data, matches = result
            if not matches:
                scheduler.give_back([index])
                raise ProviderFault(f"chunk {index} does not match its signed digest")
            hasher.offer(index, data)
            scheduler.done(index)
            self.report.chunks_fetched[provider.name] = self.report.chunks_fetched.get(provider.name, 0) + 1
            self._advance(len(data))

        async def verify(index: int, data: bytearray) -> tuple[int, bytearray, bool]:
            return index, data, await loop.run_in_executor(self.executor, self._verify_and_write, index, data)

        try:
            stream = await _open(self.p2p, provider, self.connect_timeout, self.direct)
            while provider.active:
                while len(outstanding) < 2:
                    index = scheduler.try_take() if outstanding or verifying else await scheduler.take()
                    if index is None:
                        break
                    if not provider.active:  # banned by a sibling stream while this one waited
                        scheduler.give_back([index])
                        break
                    outstanding.append(index)
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
                await _expect_ok(stream, end - start, self.stall_timeout)
                data = bytearray(end - start)
                await stream.read_into(data, self.stall_timeout, self.min_rate)
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
            if stream is not None:
                stream.close()
        return restart and provider.active

    async def fetch_chunks(self, missing: list[int], hasher: OrderedHasher) -> None:
        scheduler = ChunkScheduler(missing)
        workers: dict[asyncio.Task, _Provider] = {}
        for provider in self._usable():
            for _ in range(self.streams_per_provider):
                workers[asyncio.create_task(self._stream_worker(provider, scheduler, hasher))] = provider
        try:
            while workers and not scheduler.finished:
                finished, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    provider = workers.pop(task)
                    if task.result():  # (provider errors are caught; anything else is a bug worth seeing)
                        workers[asyncio.create_task(self._stream_worker(provider, scheduler, hasher))] = provider
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if not scheduler.finished:
            raise BlobUnavailable(self.ref, self.reasons, scheduler.remaining)


async def fetch_blob(p2p, ref: BlobRef, providers: Sequence[object], store: BlobStore, *,
                     bans: Optional[BanList] = None, progress: Optional[Progress] = None,
                     report: Optional[FetchReport] = None, streams_per_provider: int = 2,
                     stall_timeout: float = 10.0, min_rate: float = 64 * 1024,
                     connect_timeout: float = 15.0, direct: Optional[DirectRoutes] = None) -> Path:
    """Fetch blob `ref` from `providers` (hivemind `PeerID`s) into `store`; return its path there.

    `ref` must come from a signed record: every chunk is checked against `ref.chunks_sha256`, the
    whole file against `ref.sha256`. A provider that sends bad bytes or a bad digest list is added
    to `bans` (and skipped while banned); one that sends nothing for `stall_timeout` seconds, or
    delivers a chunk slower than `min_rate` bytes/s, is dropped for this download; their chunks
    go to the others. `progress(verified_bytes, total_bytes)` is called as chunks are verified;
    `report` (if given) is filled in as the download runs. With `direct`, chunks travel over direct
    TCP where a provider offers it (`node.blobs.direct`), verified alike, with p2p as the fallback.

    Raises `BlobUnavailable` naming every provider and why it failed (the partial download is
    kept: a later call resumes it); `HashMismatch` if the signed ref is itself inconsistent;
    `DownloadInProgress` if another fetch of this blob into this store is running.
    """
    started = time.perf_counter()
    report = report if report is not None else FetchReport()
    report.chunks_total = ref.num_chunks
    if store.has(ref.sha256):
        return store.path(ref.sha256)
    partial = await asyncio.to_thread(PartialDownload, store, ref)
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"blob-{ref.sha256[:8]}")
    download = _Download(p2p, ref, providers, partial, bans=bans if bans is not None else BanList(), report=report,
                         progress=progress, executor=executor, streams_per_provider=streams_per_provider,
                         stall_timeout=stall_timeout, min_rate=min_rate, connect_timeout=connect_timeout,
                         direct=direct)
    hasher = OrderedHasher(ref.num_chunks, partial.read_chunk, executor)
    try:
        await download.obtain_digests()
        resumed = await asyncio.to_thread(partial.recheck, partial.logged_chunks())
        report.chunks_resumed = len(resumed)
        for index in resumed:
            hasher.offer(index)
            start, end = chunk_span(index, ref.size)
            download.done_bytes += end - start
        if progress is not None:
            progress(download.done_bytes, ref.size)
        missing = sorted(set(range(ref.num_chunks)) - set(resumed))
        await download.fetch_chunks(missing, hasher)
        whole = await hasher.hexdigest()
        if whole != ref.sha256:
            await asyncio.to_thread(partial.discard)
            raise HashMismatch(f"blob {ref.sha256[:12]}: every chunk matches the signed digests but the whole file "
                               f"hashes to {whole[:12]}; the signed record is inconsistent")
        return await asyncio.to_thread(partial.complete)
    finally:
        hasher.cancel()
        # Threads may still be writing or hashing a chunk: let them finish before the files close
        # (a closed descriptor's number can be reused at once, by an unrelated file).
        await asyncio.to_thread(executor.shutdown)
        partial.close()
        report.seconds = time.perf_counter() - started
