"""The bootstrap peer is no single point of failure: a node keeps the peers it met in its data dir
(bounded, written atomically) and, when every initial peer is down, rejoins through them. Real
processes on 127.0.0.1: a bootstrap, node A and node B; the bootstrap goes away, B restarts with
only the dead bootstrap as its initial peer, and still joins A's swarm and sees A's records."""

import json

import pytest
import yaml

from node.swarm.manifest_files import write_manifest_file
from node.swarm.peer_cache import MAX_CACHED_PEERS, PeerCache
from protocol.manifest import SwarmManifest
from tests.swarm_harness import ROOT, BootstrapProcess, NodeProcess, wait_until

pytestmark = pytest.mark.timeout(400)
TINY = ROOT / "tests" / "manifests" / "tiny.yaml"


def test_a_node_rejoins_through_its_cached_peers_when_every_bootstrap_is_down(tmp_path):
    path = tmp_path / "swarm.yaml"
    write_manifest_file(SwarmManifest.from_dict(yaml.safe_load(TINY.read_text())), path)
    boot = BootstrapProcess(path, tmp_path / "boot.key")
    a = NodeProcess(path, tmp_path / "a", boot.maddrs, "--job", "expert/0")
    b = NodeProcess(path, tmp_path / "b", boot.maddrs, "--job", "expert/1")
    processes = [boot, a, b]
    try:
        a_id = wait_until(lambda: (tmp_path / "a" / "p2p.key").exists() and _peer_id(a), 120, "node A to join")
        wait_until(lambda: any(a_id in p for p in PeerCache(tmp_path / "b" / "peers.json").load()), 180,
                   "node B to cache node A's address")
        boot.kill()
        b.stop()
        b = NodeProcess(path, tmp_path / "b", boot.maddrs, "--job", "expert/1")  # only the dead bootstrap
        processes.append(b)
        b.wait_for(lambda line: "rejoining through" in line, timeout=120)
        # B's mirror reads A's checkpoint records, fetches one from A and serves it
        b.wait_for(lambda line: "mirroring expert/0" in line, timeout=120)
        assert a.alive() and b.alive()
    finally:
        for process in processes:
            process.kill()


def _peer_id(node):
    lines = [line for line in node.output if "joined swarm" in line]
    return lines[0].split(" as ")[1].split()[0] if lines else None


def test_the_peer_cache_is_bounded_and_a_damaged_one_reads_as_empty(tmp_path):
    cache = PeerCache(tmp_path / "peers.json")
    assert cache.load() == []
    maddrs = [f"/ip4/127.0.0.1/tcp/{4000 + i}/p2p/12D3KooWpeer{i}" for i in range(100)]
    cache.save(maddrs + maddrs)
    assert cache.load() == maddrs[:MAX_CACHED_PEERS]
    for damaged in (b"{not json", json.dumps([1, 2]).encode(), json.dumps({"peers": [7, "x"]}).encode(), b"\xff"):
        (tmp_path / "peers.json").write_bytes(damaged)
        assert cache.load() == []
