"""BlobStore and partial downloads on disk: content addressing, atomicity, verification, gc, resume."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.blobs.banlist import BanList
from node.blobs.partial import DownloadInProgress, PartialDownload
from node.blobs.schedule import ChunkScheduler
import node.blobs.store as blobstore_module
from node.blobs.store import BlobNotFound, BlobStore, CorruptBlob
from protocol.encoding import canonical_encode
from protocol.errors import InvalidRecord
from protocol.hashing import BlobRef, blob_ref_of, blob_ref_of_chunks, chunk_span
from protocol.limits import CHUNK_BYTES

REPO = Path(__file__).resolve().parents[1]


def blob_bytes(size: int, seed: int = 0) -> bytes:
    return bytes((i * 131 + seed) % 251 for i in range(256)) * (size // 256) + b"x" * (size % 256)


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(tmp_path / "store")


def test_put_bytes_returns_the_ref_and_the_bytes_read_back(store):
    data = blob_bytes(2 * CHUNK_BYTES + 1000)
    ref = store.put_bytes(data)
    assert ref == blob_ref_of(data)
    assert store.has(ref.sha256) and store.list() == [ref.sha256]
    assert store.path(ref.sha256).read_bytes() == data
    assert store.ref(ref.sha256) == ref
    assert store.read_range(ref.sha256, CHUNK_BYTES - 5, CHUNK_BYTES + 5) == data[CHUNK_BYTES - 5:CHUNK_BYTES + 5]


def test_stored_chunk_digests_match_the_ref(store):
    data = blob_bytes(3 * CHUNK_BYTES - 7)
    ref = store.put_bytes(data)
    _, digests = blob_ref_of_chunks([data])
    assert store.chunk_digests(ref.sha256) == digests
    assert store.digest_bytes(ref.sha256) == b"".join(digests)
    ref.check_digest_list(store.chunk_digests(ref.sha256))


def test_put_file_equals_put_bytes_and_is_idempotent(store, tmp_path):
    data = blob_bytes(CHUNK_BYTES + 3, seed=7)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    assert store.put_file(source) == store.put_bytes(data) == store.put_file(source)
    assert store.list() == [blob_ref_of(data).sha256]
    assert list((store.root / "tmp").iterdir()) == []


def test_put_own_file_moves_a_temp_file_into_the_store_without_a_copy(store):
    data = blob_bytes(CHUNK_BYTES + 5, seed=3)
    fd, tmp = store.temp_file()
    with os.fdopen(fd, "wb") as sink:
        sink.write(data)
    inode = os.stat(tmp).st_ino
    ref = store.put_own_file(tmp)
    assert ref == store.put_bytes(data) and store.verify(ref.sha256) == ref
    assert os.stat(store.path(ref.sha256)).st_ino == inode  # moved, not copied
    assert not tmp.exists() and list((store.root / "tmp").iterdir()) == []


def test_an_empty_blob_is_stored_like_any_other(store):
    ref = store.put_bytes(b"")
    assert ref.size == 0 and store.has(ref.sha256) and store.chunk_digests(ref.sha256) == []


def test_a_missing_blob_raises_blob_not_found(store):
    with pytest.raises(BlobNotFound):
        store.path("0" * 64)
    with pytest.raises(ValueError):
        store.has("not-a-sha")


def test_a_range_outside_the_blob_is_refused(store):
    ref = store.put_bytes(b"0123456789")
    with pytest.raises(ValueError, match="outside"):
        store.read_range(ref.sha256, 5, 11)


def test_a_corrupted_blob_is_detected_quarantined_and_reported(store):
    good = store.put_bytes(blob_bytes(1000, seed=1))
    bad = store.put_bytes(blob_bytes(2 * CHUNK_BYTES, seed=2))
    with open(store.path(bad.sha256), "r+b") as data:
        data.seek(CHUNK_BYTES + 3)
        data.write(b"\x00\x01")
    with pytest.raises(CorruptBlob, match="quarantined"):
        store.verify(bad.sha256)
    assert not store.has(bad.sha256) and store.list() == [good.sha256]
    assert [p.name.split(".")[0] for p in (store.root / "quarantine").iterdir()] == [bad.sha256]
    assert store.verify_all() == []


def test_verify_all_reports_every_corrupt_blob(store):
    refs = [store.put_bytes(blob_bytes(500, seed=s)) for s in range(3)]
    store.path(refs[1].sha256).write_bytes(b"truncated")
    assert store.verify_all() == [refs[1].sha256]
    assert store.list() == sorted(r.sha256 for r in (refs[0], refs[2]))


def test_gc_removes_unreferenced_blobs_and_partials_and_keeps_referenced_ones(store):
    kept = store.put_bytes(b"kept")
    dropped = store.put_bytes(b"dropped")
    stale = blob_ref_of(b"stale partial")
    PartialDownload(store, stale).close()
    report = store.gc(keep=[kept.sha256])
    assert store.list() == [kept.sha256]
    assert report.blobs == [dropped.sha256] and report.partials == [stale.sha256]
    assert report.bytes_freed >= len(b"dropped")


def test_gc_spares_a_partial_download_that_is_in_progress(store):
    ref = blob_ref_of(b"in progress")
    partial = PartialDownload(store, ref)
    try:
        assert store.gc(keep=[]).partials == []
        assert partial.directory.exists()
    finally:
        partial.close()


def test_gc_tolerates_a_partial_that_a_finishing_download_removes_while_gc_looks_at_it(store, monkeypatch):
    ref = blob_ref_of(b"finishing")
    PartialDownload(store, ref).close()
    looked_at = blobstore_module._newest_mtime

    def download_finishes_first(path):  # the mirror's download commits between iterdir() and stat()
        shutil.rmtree(path)
        return looked_at(path)

    monkeypatch.setattr(blobstore_module, "_newest_mtime", download_finishes_first)
    assert store.gc(keep=[ref.sha256]).partials == []


def test_gc_removes_a_partial_untouched_for_too_long(store):
    ref = blob_ref_of(b"old")
    PartialDownload(store, ref).close()
    assert store.gc(keep=[ref.sha256]).partials == []
    assert store.gc(keep=[ref.sha256], partial_max_age_s=-1).partials == [ref.sha256]


def test_a_commit_interrupted_between_digests_and_data_leaves_nothing_visible(store):
    ref = store.put_bytes(b"about to vanish")
    store.path(ref.sha256).unlink()  # as if the crash came before the data file's rename
    assert not store.has(ref.sha256) and store.list() == []
    assert store.gc(keep=[ref.sha256]).leftovers == [f"blobs/{ref.sha256[:2]}/{ref.sha256}.digests"]


def test_a_writer_killed_in_the_middle_of_a_put_leaves_no_visible_blob(store, tmp_path):
    fifo = tmp_path / "source.fifo"
    os.mkfifo(fifo)
    code = f"from node.blobs.store import BlobStore; BlobStore({str(store.root)!r}).put_file({str(fifo)!r})"
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    with open(fifo, "wb") as pipe:
        pipe.write(blob_bytes(3 * CHUNK_BYTES))
        pipe.flush()
        time.sleep(0.5)  # the child has now written part of its temporary file
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert store.list() == []
    assert list((store.root / "blobs").iterdir()) == []
    leftovers = list((store.root / "tmp").iterdir())
    assert leftovers and leftovers[0].stat().st_size > 0
    assert store.gc(keep=[], leftover_age_s=0).leftovers == [f"tmp/{leftovers[0].name}"]


def test_a_partial_download_resumes_only_chunks_that_still_verify(store):
    data = blob_bytes(3 * CHUNK_BYTES + 10)
    ref, digests = blob_ref_of_chunks([data])
    partial = PartialDownload(store, ref)
    partial.set_digests(digests)
    for index in (0, 1, 3):
        start, end = chunk_span(index, ref.size)
        partial.write_chunk(index, data[start:end])
        partial.record_verified(index)
    partial.close()
    with open(store.partial_dir(ref) / "data", "r+b") as file:  # chunk 1 rots on disk meanwhile
        file.seek(CHUNK_BYTES + 1)
        file.write(b"\xff")
    with open(store.partial_dir(ref) / "verified", "ab") as log:
        log.write(b"\x00\x00")  # a torn entry from a crash while appending
    resumed = PartialDownload(store, ref)
    assert resumed.digests == digests
    assert resumed.logged_chunks() == [0, 1, 3]
    assert resumed.recheck(resumed.logged_chunks()) == [0, 3]
    resumed.close()


def test_a_reference_pairing_a_blobs_id_with_another_size_or_digest_list_cannot_be_built():
    ref = blob_ref_of(blob_bytes(CHUNK_BYTES + 1))
    for size, chunks in ((ref.size + 1, ref.chunks_sha256), (ref.size, "0" * 64)):
        with pytest.raises(InvalidRecord, match="not the root"):
            BlobRef(ref.sha256, size, chunks)
    assert BlobRef(ref.sha256, ref.size, ref.chunks_sha256) == ref


def test_a_partial_download_whose_stored_ref_is_another_starts_over(store):
    data = blob_bytes(CHUNK_BYTES + 1)
    ref, digests = blob_ref_of_chunks([data])
    partial = PartialDownload(store, ref)
    partial.set_digests(digests)
    partial.write_chunk(0, data[:CHUNK_BYTES])
    partial.record_verified(0)
    partial.close()
    other_ref = BlobRef.of(ref.size + 1, ref.chunks_sha256)
    (partial.directory / "ref").write_bytes(canonical_encode(other_ref.to_wire()))  # a torn or foreign state
    again = PartialDownload(store, ref)
    assert again.digests is None and again.logged_chunks() == []
    again.close()


def test_two_downloads_of_one_blob_cannot_share_a_partial(store):
    ref = blob_ref_of(b"once")
    first = PartialDownload(store, ref)
    with pytest.raises(DownloadInProgress):
        PartialDownload(store, ref)
    first.close()
    PartialDownload(store, ref).close()


def test_a_completed_partial_becomes_a_stored_blob(store):
    data = blob_bytes(2 * CHUNK_BYTES - 1)
    ref, digests = blob_ref_of_chunks([data])
    partial = PartialDownload(store, ref)
    partial.set_digests(digests)
    for index in (1, 0):
        start, end = chunk_span(index, ref.size)
        partial.write_chunk(index, data[start:end])
    path = partial.complete()
    assert path.read_bytes() == data and store.ref(ref.sha256) == ref
    assert not store.partial_dir(ref).exists()


def test_a_ban_names_its_reason_and_can_expire():
    bans = BanList()
    bans.ban("peerA", "sent bad bytes")
    bans.ban("peerB", "sent a bad digest list", duration_s=0)
    assert bans.reason("peerA") == "sent bad bytes"
    assert not bans.is_banned("peerB") and [b.peer for b in bans] == ["peerA"]


def test_a_ban_is_scoped_to_one_blob_reference_and_a_default_ban_does_not_last_for_ever():
    bans = BanList()
    bans.ban("peerA", "its chunks contradict the digest list", scope="ref-1")
    assert bans.is_banned("peerA", "ref-1") and not bans.is_banned("peerA", "ref-2") and not bans.is_banned("peerA")
    assert all(ban.until < time.time() + 24 * 3600 for ban in bans)


def test_a_cache_over_its_quota_drops_its_least_recently_used_blobs_but_keeps_the_ones_in_use(store):
    refs = [store.put_bytes(blob_bytes(1000, seed)) for seed in range(4)]
    for age, ref in zip((400, 300, 200, 100), refs):  # refs[0] used longest ago
        os.utime(store.path(ref.sha256), (time.time() - age, time.time() - age))
    store.touch(refs[1].sha256)
    report = store.collect(3000, keep={refs[0].sha256})
    assert sorted(report.blobs) == sorted([refs[2].sha256])
    assert [store.has(ref.sha256) for ref in refs] == [True, True, False, True]


def test_a_cache_drops_partial_downloads_abandoned_for_a_day_but_not_a_running_one(store):
    old, running = blob_ref_of(blob_bytes(300)), blob_ref_of(blob_bytes(400))
    PartialDownload(store, old).close()
    active = PartialDownload(store, running)
    for directory in (store.partial_dir(old), store.partial_dir(running)):
        os.utime(directory, (time.time() - 2 * 24 * 3600,) * 2)
        for file in directory.iterdir():
            os.utime(file, (time.time() - 2 * 24 * 3600,) * 2)
    store.collect(10**9)
    assert not store.partial_dir(old).exists() and store.partial_dir(running).exists()
    active.close()


def test_chunks_given_back_by_a_failed_worker_go_to_a_waiting_one():
    async def scenario():
        scheduler = ChunkScheduler([0, 1])
        first, second = scheduler.try_take(), scheduler.try_take()
        waiting = asyncio.create_task(scheduler.take())
        await asyncio.sleep(0)
        assert not waiting.done()
        scheduler.done(first)
        scheduler.give_back([second])
        assert await waiting == 1
        scheduler.done(1)
        assert scheduler.finished and await scheduler.take() is None

    asyncio.run(scenario())


def test_in_the_endgame_an_idle_worker_gets_a_chunk_in_flight_elsewhere_and_the_first_copy_counts():
    async def scenario():
        scheduler = ChunkScheduler([0])
        assert scheduler.try_take() == 0
        assert scheduler.try_take() is None  # outside the endgame nothing is handed out twice
        assert scheduler.try_take([0], endgame=True) is None  # never twice to the same worker
        assert scheduler.try_take(endgame=True) == 0
        assert scheduler.try_take(endgame=True) is None  # at most two copies in flight
        scheduler.done(0)
        scheduler.give_back([0])  # the slower copy's worker fails afterwards: nothing comes back
        assert scheduler.finished and scheduler.is_done(0)

    asyncio.run(scenario())
