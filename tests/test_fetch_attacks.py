"""The review's attacks on blob transfer (issue 15, findings 1, 7, 8, 9), each against real peer
processes on 127.0.0.1 (hivemind DHT + p2pd): a signed reference with an honest blob's id and a
made-up digest list (refused since protocol 4: the id is the root of the list), a liar serving a
forged digest list, a provider trickling a byte every 0.7 s, records whose providers never
deliver, streams cut part way through a chunk (as a circuit relay cuts them), and thousands of
fake providers. Each test shows the downloader outliving the attack."""

import hashlib
import os

import pytest

from protocol.hashing import DIGEST_BYTES, blob_root, digest_list_sha256
from protocol.limits import CHUNK_BYTES
from tests.peer_processes import PeerProcess, blob_providers

pytestmark = pytest.mark.timeout(300)
BLOB_BYTES = 8 * CHUNK_BYTES
BEHAVIOURS = {
    "honest": [],
    "bad-digests": ["--behaviour", "bad-digests"],  # serves a digest list with its first byte flipped
    "trickle": ["--behaviour", "trickle"],
    "slow": ["--rate-mb-s", "0.1"],  # above the minimum chunk rate, far below the download's deadline
    "cut": ["--behaviour", "cut", "--cut-after-bytes", str(120 * 1024)],  # a circuit relay's data limit
    "cut-short": ["--behaviour", "cut", "--cut-after-bytes", str(8 * 1024)],
    "cut-flaky": ["--behaviour", "cut", "--cut-after-bytes", str(120 * 1024), "--close-every", "3"],
}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("fetch-attacks")
    with blob_providers(root, BEHAVIOURS, BLOB_BYTES) as (blob, _, ready):
        ref = ready["honest"]["ref"]
        yield {"root": root, "ready": ready, "ref": ref, "sha256": hashlib.sha256(blob.read_bytes()).hexdigest(),
               "true": f"{ref['sha256']}:{ref['size']}:{ref['chunks_sha256']}"}


def fetch(swarm, store: str, refs, names, *flags: str) -> PeerProcess:
    ready = [swarm["ready"][name] for name in names]
    return PeerProcess("blob_fetcher.py", "--store", str(swarm["root"] / store), "--ref", *refs,
                       "--providers", *[r["peer_id"] for r in ready],
                       "--initial-peers", *[r["maddrs"][0] for r in ready], "--stall-timeout", "2", *flags,
                       log_dir=swarm["root"])


def outcomes(fetcher: PeerProcess, count: int, timeout: float) -> list[dict]:
    try:
        last = fetcher.wait_for(lambda e: e["event"] in ("done", "error") and e["ref"] == count - 1, timeout)
        assert last
        return [e for e in fetcher.events if e["event"] in ("done", "error")]
    finally:
        fetcher.stop()


def peer(swarm, name: str) -> str:
    return swarm["ready"][name]["peer_id"]


def test_a_reference_with_an_honest_blobs_id_and_a_made_up_digest_list_is_refused_before_any_provider_is_asked(swarm):
    ref = swarm["ref"]
    bogus = f"{ref['sha256']}:{ref['size']}:{os.urandom(32).hex()}"
    first, second = outcomes(fetch(swarm, "store-bogus", [bogus, swarm["true"]], ["honest"]), 2, 60)
    assert first["event"] == "error" and first["type"] == "InvalidRecord", first
    assert "not the root" in first["message"] and first["report"]["chunks_fetched"] == {}
    assert second["event"] == "done", second  # the honest provider still serves the real reference
    assert peer(swarm, "honest") not in second["bans"]


def test_a_liar_serving_a_forged_digest_list_cannot_have_it_signed_under_the_honest_id(swarm):
    # The liar serves a digest list with its first byte flipped for the honest blob. Before protocol 4
    # it could also sign a record naming the honest blob's sha256 with that list, and the honest
    # provider's chunks then contradicted the forged digests; now such a record cannot be built, and
    # a record of the forged list names another blob, which the honest provider does not hold.
    ref = swarm["ref"]
    store = swarm["root"] / "bad-digests" / "blobs" / ref["sha256"][:2] / f"{ref['sha256']}.digests"
    forged = store.read_bytes()
    digests = [forged[i:i + DIGEST_BYTES] for i in range(0, len(forged), DIGEST_BYTES)]
    forged_chunks = digest_list_sha256(digests)
    under_honest_id = f"{ref['sha256']}:{ref['size']}:{forged_chunks}"
    own_blob = f"{blob_root(ref['size'], forged_chunks)}:{ref['size']}:{forged_chunks}"
    first, second, third = outcomes(fetch(swarm, "store-forged", [under_honest_id, own_blob, swarm["true"]],
                                          ["bad-digests", "honest"]), 3, 90)
    assert first["event"] == "error" and first["type"] == "InvalidRecord", first
    assert second["event"] == "error" and second["type"] == "NotProvided", second  # nobody holds that blob
    assert third["event"] == "done", third
    with open(third["path"], "rb") as file:
        assert hashlib.file_digest(file, "sha256").hexdigest() == swarm["sha256"]
    # the liar is banned if it was asked before the honest list arrived (its list contradicts the id)
    assert set(third["report"]["banned"]) <= {peer(swarm, "bad-digests")}
    assert peer(swarm, "honest") not in third["bans"]


def test_a_provider_trickling_a_byte_every_0_7_s_is_dropped_and_the_download_finishes_from_another(swarm):
    (result,) = outcomes(fetch(swarm, "store-trickle", [swarm["true"]], ["trickle", "honest"]), 1, 60)
    assert result["event"] == "done", result
    assert result["report"]["seconds"] < 15, result["report"]  # the download itself, not the process start
    assert result["report"]["chunks_fetched"].get(peer(swarm, "trickle"), 0) == 0


def test_a_provider_whose_every_stream_is_cut_after_120_KiB_still_delivers_the_blob_piece_by_piece(swarm):
    # what a trainer behind a NAT looks like through a circuit relay with go-libp2p's default data
    # limit (128 KiB per circuit)
    (result,) = outcomes(fetch(swarm, "store-cut", [swarm["true"]], ["cut"]), 1, 120)
    assert result["event"] == "done", result
    with open(result["path"], "rb") as file:
        assert hashlib.file_digest(file, "sha256").hexdigest() == swarm["sha256"]
    # every chunk arrived in pieces: its first 120 KiB, then the rest on new streams
    assert result["report"]["pieces_resumed"] >= BLOB_BYTES // (120 * 1024) - 8, result["report"]
    assert not result["report"]["banned"] and not result["report"]["dropped"], result["report"]


def test_a_provider_that_also_closes_every_third_stream_before_its_first_byte_still_delivers_the_blob(swarm):
    # a stream that brings nothing costs the provider nothing while its other streams bring plenty:
    # what it has delivered on its cut streams, on average, is what decides
    (result,) = outcomes(fetch(swarm, "store-cut-flaky", [swarm["true"]], ["cut-flaky"]), 1, 120)
    assert result["event"] == "done", result
    with open(result["path"], "rb") as file:
        assert hashlib.file_digest(file, "sha256").hexdigest() == swarm["sha256"]
    assert not result["report"]["banned"] and not result["report"]["dropped"], result["report"]


def test_a_provider_cutting_streams_after_8_KiB_is_dropped_and_the_download_finishes_from_another(swarm):
    (result,) = outcomes(fetch(swarm, "store-cut-short", [swarm["true"]], ["cut-short", "honest"]), 1, 60)
    assert result["event"] == "done", result
    assert result["report"]["chunks_fetched"].get(peer(swarm, "cut-short"), 0) == 0
    assert "closed" in result["report"]["dropped"][peer(swarm, "cut-short")], result["report"]


def test_a_download_that_would_outlast_its_deadline_gives_up_at_the_deadline(swarm):
    # the throttled provider sends 256 KiB pieces about 2.6 s apart: a stall timeout longer than the
    # deadline leaves the deadline as the only thing that can end this download
    (result,) = outcomes(fetch(swarm, "store-deadline", [swarm["true"]], ["slow"], "--deadline", "6",
                               "--stall-timeout", "30"), 1, 60)
    assert result["event"] == "error" and result["type"] == "BlobUnavailable", result
    assert "deadline" in result["message"]
    assert result["report"]["seconds"] < 10, result["report"]


def test_records_whose_providers_never_deliver_leave_no_partial_download_and_reserve_no_disk(swarm):
    fakes = [f"{blob_root(BLOB_BYTES, chunks)}:{BLOB_BYTES}:{chunks}" for chunks in (os.urandom(32).hex() for _ in range(8))]
    results = outcomes(fetch(swarm, "store-fakes", fakes, ["honest"], "--fake-providers", "3"), 8, 120)
    left = list((swarm["root"] / "store-fakes" / "partial").iterdir())
    assert left == [], f"{len(left)} partials, {sum(f.stat().st_blocks * 512 for d in left for f in d.iterdir())} bytes"
    assert [r["type"] for r in results] == ["NotProvided"] * 8, results


def test_two_thousand_fake_providers_neither_pin_descriptors_nor_stop_the_download(swarm):
    (result,) = outcomes(fetch(swarm, "store-sybil", [swarm["true"]], ["honest"], "--fake-providers", "2000"),
                         1, 180)
    assert result["event"] == "done", {k: result[k] for k in ("type", "message", "max_fds") if k in result}
    # bounded (16 providers, 8 opens at a time, each open a socket to p2pd): measured 108-140 over the
    # process's own 16; before the fix, 2,000 fake providers pinned the process's limit (1,024)
    assert result["max_fds"] - result["base_fds"] < 256, (result["max_fds"], result["base_fds"])
