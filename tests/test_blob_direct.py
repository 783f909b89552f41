"""The direct-TCP fast path for blob chunks (node/blobs/direct.py), between real peer processes on
127.0.0.1: chunks travel over a provider's direct port and are verified like p2p ones; forged bytes
there cost the route, never a ban, and the download finishes over p2p; a provider without a direct
port is fetched over p2p as before."""

import hashlib
import os

import pytest

from protocol.limits import CHUNK_BYTES
from tests.peer_processes import PeerProcess

pytestmark = pytest.mark.timeout(180)
BLOB_BYTES = 6 * CHUNK_BYTES
PROVIDERS = {"direct": ["--direct"], "forging": ["--behaviour", "corrupt-direct"], "p2p-only": []}


@pytest.fixture(scope="module")
def providers(tmp_path_factory):
    root = tmp_path_factory.mktemp("blob-direct")
    blob = root / "blob.bin"
    blob.write_bytes(os.urandom(BLOB_BYTES))
    peers = {name: PeerProcess("blob_provider.py", "--store", str(root / name), "--put", str(blob), *flags,
                               log_dir=root) for name, flags in PROVIDERS.items()}
    try:
        ready = {name: peer.wait_event("ready", 60) for name, peer in peers.items()}
        yield {"root": root, "ready": ready, "sha256": hashlib.sha256(blob.read_bytes()).hexdigest()}
    finally:
        for peer in peers.values():
            peer.stop()


def fetch_from(providers, name: str) -> dict:
    ready = providers["ready"][name]
    ref = ready["ref"]
    fetcher = PeerProcess("blob_fetcher.py", "--store", str(providers["root"] / f"fetched-{name}"),
                          "--ref", f"{ref['sha256']}:{ref['size']}:{ref['chunks_sha256']}",
                          "--providers", ready["peer_id"], "--initial-peers", ready["maddrs"][0], "--direct",
                          log_dir=providers["root"])
    result = fetcher.wait_for(lambda e: e["event"] in ("done", "error"), 90)
    fetcher.stop()
    assert result["event"] == "done", result
    with open(result["path"], "rb") as fetched:
        assert hashlib.sha256(fetched.read()).hexdigest() == providers["sha256"]
    return result


def test_chunks_travel_over_the_providers_direct_port_and_match_the_signed_digests(providers):
    result = fetch_from(providers, "direct")
    assert result["direct"]["opened"] >= 1 and result["direct"]["refusals"] == {}
    assert result["report"]["banned"] == {} and result["bans"] == {}


def test_forged_bytes_on_the_direct_port_cost_the_route_not_a_ban_and_p2p_finishes_the_download(providers):
    result = fetch_from(providers, "forging")
    peer = providers["ready"]["forging"]["peer_id"]
    assert "does not match its digest" in result["direct"]["refusals"][peer]
    assert result["report"]["banned"] == {} and result["bans"] == {}
    assert result["report"]["chunks_fetched"][peer] == BLOB_BYTES // CHUNK_BYTES


def test_provider_without_a_direct_port_is_fetched_over_p2p(providers):
    result = fetch_from(providers, "p2p-only")
    assert result["direct"]["opened"] == 0 and result["direct"]["refusals"] == {}
