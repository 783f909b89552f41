"""One download's machinery: the providers it uses and what became of each, the digest list, and
the streams that fetch, verify and write its chunks. `node.blobs.fetch.fetch_blob` (the entry point:
deadline, partial download, the order of the phases) drives it; its docstring says what each phase
does and why."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Optional, Sequence

from protocol.blob_wire import BlobRequest
from protocol.errors import HashMismatch
from protocol.hashing import DIGEST_BYTES, BlobRef, chunk_span
from node.blobs.banlist import BanList
from node.blobs.buffers import ChunkBuffers
from node.blobs.direct import DirectRoutes
from node.blobs.outcome import BlobUnavailable, FetchReport, NotProvided, ref_key
from node.blobs.partial import PartialDownload
from node.blobs.provider import Provider, ProviderBusy, ProviderFault, ProviderGone, expect_ok, open_stream
from node.blobs.schedule import ChunkScheduler
from node.blobs.stream import StreamClosed, StreamReceiver, StreamStalled

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (verified bytes, total bytes)
Reconnect = Callable[[object], Awaitable[bool]]  # (peer) -> whether a new connection to it was made
MAX_PROVIDERS = 16  # providers one download uses, sampled from those given
MAX_OPENING = 8  # streams being opened at once (each pending open holds a descriptor to the daemon)
# A stream cut off part way (a circuit relay ends a relayed connection at its data or time limit; a
# relayed connection is closed once hole punching made a direct one) is followed by a new one, the
# chunk it was reading resumed where it stopped, as long as the provider's cut streams brought at
# least this much each on average, one stream's worth spared. A cut stream brings anything from
# nothing to what was sent: the cut resets it, and a yamux reset discards what the downloader's
# daemon had not passed on yet (seen under load: a stream whose provider sent 120 KiB arrived
# empty). So one short stream costs a provider that delivers nothing, while one closing every
# stream sooner than the average is dropped after two or three. A provider gets at most
# `MAX_CUTS_PER_MIB` * the blob's MiB (+ 64) new streams.
MIN_RESUMED_BYTES = 16 * 1024
MAX_CUTS_PER_MIB = 16


class Download:
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
        self._counted_cuts: weakref.WeakSet = weakref.WeakSet()  # cut streams `_may_resume` has counted

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
    async def _ask_digests(self, provider: Provider) -> Optional[list[bytes]]:
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
            except HashMismatch as error:
                # the blob's id is the root of its digest list (protocol 4): whoever holds the blob
                # holds that list, so another one is the provider's lie, not the record's
                self._ban(provider, f"its chunk digest list contradicts the blob's id ({error})")
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
        candidates = iter(self._usable())
        found: list[list[bytes]] = []

        async def asker() -> None:
            while not found and (provider := next(candidates, None)) is not None:
                digests = await self._ask_digests(provider)
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
        one on a worker thread while the next arrives. True: its direct route failed or its stream was
        cut between two answers (see `_may_resume`): start it again."""
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
                    await self._ask(stream, index)
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
                        await self._ask(stream, later)
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

    async def _ask(self, stream: StreamReceiver, index: int, skip: int = 0) -> None:
        """Request chunk `index` on `stream`, less its first `skip` bytes."""
        start, end = chunk_span(index, self.ref.size)
        await stream.send(BlobRequest.range(self.ref.sha256, start + skip, end).encode())

    def _may_resume(self, provider: Provider, stream: Optional[StreamReceiver]) -> bool:
        """Whether a cut `stream` of `provider` is followed by a new one (see `MIN_RESUMED_BYTES`).
        Each stream is counted once, so asking again about one already counted (the stream a worker
        began with, after `_resume_chunk` gave up on a later one) judges the provider as it stands."""
        if stream is None:
            return False
        if self.direct is not None and self.direct.carried(stream):
            return False  # a direct route that fails is refused, never resumed (see `_direct_failed`)
        if stream not in self._counted_cuts:
            self._counted_cuts.add(stream)
            provider.cuts += 1
            provider.cut_bytes += stream.received
        if provider.cut_bytes < MIN_RESUMED_BYTES * (provider.cuts - 1):
            return False
        return provider.cuts <= MAX_CUTS_PER_MIB * (self.ref.size >> 20) + 64

    async def _resume_chunk(self, provider: Provider, index: int, data: bytearray, filled: int) -> StreamReceiver:
        """Fetch the rest of chunk `index` (its first `filled` bytes are in `data`) on new streams, each
        asking for the bytes still missing, until all have arrived; return the last stream, with
        nothing asked on it. Over a circuit relay each new stream rides a new circuit once the last
        one was used up. Raises `StreamClosed` once `_may_resume` says no."""
        view = memoryview(data)
        while True:
            stream = await self.open(provider)
            try:
                await self._ask(stream, index, skip=filled)
                await expect_ok(stream, len(view) - filled, self.stall_timeout)
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
