"""A real swarm on 127.0.0.1: a bootstrap peer, three honest peers and an adversary, each a separate
process with its own p2pd. Records flow between honest peers; forged, oversized, squatting and
malformed records are refused by every honest peer, and no peer crashes.
"""

import dataclasses
import time

import msgpack
import pytest

from node.swarm.manifest_files import write_manifest_file
from protocol.hashing import BlobRef
from protocol.identity import Identity
from protocol.keys import checkpoint_key, claims_key
from protocol.limits import MAX_RECORD_BYTES, MAX_SUBKEYS_PER_KEY
from protocol.records import CheckpointRecord, Claim, ProviderRecord, decode_record
from tests.protocol_fixtures import checkpoint_fields, manifest
from tests.swarm_harness import BootstrapProcess, DhtPeer, LineProcess, child_env

pytestmark = pytest.mark.timeout(240)
MALLORY = Identity.generate()
ALICE = Identity.generate()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swarm")
    m = manifest()
    path = tmp / "unit.yaml"
    write_manifest_file(m, path)
    boot = BootstrapProcess(path, tmp / "boot.key")
    peers = [DhtPeer(path, boot.maddrs) for _ in range(3)]
    adversary = DhtPeer(path, boot.maddrs, adversary=True)
    yield {"manifest": m, "path": path, "boot": boot, "peers": peers, "adversary": adversary, "tmp": tmp}
    for process in (*peers, adversary, boot):
        process.stop()


def _claim(m, peer_id, signer=ALICE, **overrides):
    fields = dict(swarm_id=m.swarm_id, job="expert/0", model="tiny-fm", peer_id=peer_id, step=0,
                  state="training", expires_at=time.time() + 60)
    fields.update(overrides)
    return Claim(**fields).signed_by(signer)


def _readers_see(swarm, subkey):
    """Which honest peers can see an entry under `subkey` at the claims key."""
    key = claims_key(swarm["manifest"].swarm_id)
    return [peer.call("get_raw", key=key)["subkeys"].count(subkey) > 0 for peer in swarm["peers"]]


def _adversary_stores(swarm, subkey, value: bytes, expiration):
    swarm["adversary"].call("store_raw", key=claims_key(swarm["manifest"].swarm_id), subkey=subkey,
                            value=value.hex(), expiration=expiration)


def test_record_stored_by_one_peer_is_read_by_the_others(swarm):
    writer, *readers = swarm["peers"]
    identity = Identity.generate()
    claim = _claim(swarm["manifest"], writer.peer_id, signer=identity)
    writer.call("publish", record=claim.encode().hex())
    for reader in readers:
        records = [decode_record(bytes.fromhex(r)) for r in reader.call("read", family="claims")["records"]]
        assert claim in records


def test_valid_record_pushed_by_a_bare_hivemind_peer_reaches_every_honest_peer(swarm):
    # the control for the refusals below: the adversary's raw stores do reach the honest peers
    honest = Identity.generate()
    claim = _claim(swarm["manifest"], swarm["adversary"].peer_id, signer=honest)
    _adversary_stores(swarm, honest.signer_id, claim.encode(), claim.expires_at)
    assert _readers_see(swarm, honest.signer_id) == [True, True, True]


def test_record_signed_by_another_key_is_refused_by_every_honest_peer(swarm):
    forged = dataclasses.replace(_claim(swarm["manifest"], swarm["adversary"].peer_id), signer=MALLORY.signer_id)
    _adversary_stores(swarm, MALLORY.signer_id, forged.encode(), forged.expires_at)
    assert _readers_see(swarm, MALLORY.signer_id) == [False, False, False]


def test_record_with_a_bad_signature_is_refused_by_every_honest_peer(swarm):
    victim = Identity.generate()
    claim = _claim(swarm["manifest"], swarm["adversary"].peer_id, signer=victim)
    tampered = dataclasses.replace(claim, step=10**6)  # keeps the old signature
    _adversary_stores(swarm, victim.signer_id, tampered.encode(), tampered.expires_at)
    assert _readers_see(swarm, victim.signer_id) == [False, False, False]


def test_oversized_record_is_refused_by_every_honest_peer(swarm):
    sneaky = Identity.generate()
    _adversary_stores(swarm, sneaky.signer_id, b"\x00" * (MAX_RECORD_BYTES * 4), time.time() + 60)
    assert _readers_see(swarm, sneaky.signer_id) == [False, False, False]


def test_far_future_expiration_is_refused_by_every_honest_peer(swarm):
    squatter = Identity.generate()
    far = time.time() + 365 * 24 * 3600
    claim = _claim(swarm["manifest"], swarm["adversary"].peer_id, signer=squatter, expires_at=far)
    _adversary_stores(swarm, squatter.signer_id, claim.encode(), far)
    assert _readers_see(swarm, squatter.signer_id) == [False, False, False]


def test_malformed_msgpack_is_refused_by_every_honest_peer(swarm):
    junk = Identity.generate()
    _adversary_stores(swarm, junk.signer_id, b"\xc1\xff\x00garbage", time.time() + 60)
    _adversary_stores(swarm, junk.signer_id + "x", msgpack.packb({"kind": "claim"}), time.time() + 60)
    assert _readers_see(swarm, junk.signer_id) == [False, False, False]


def test_no_peer_crashed_and_honest_peers_counted_refusals(swarm):
    for process in (*swarm["peers"], swarm["adversary"], swarm["boot"]):
        assert process.alive()
    refused = [sum(peer.call("stats")["refused"].values()) for peer in swarm["peers"]]
    assert sum(refused) > 0


def test_bootstrap_peer_id_is_stable_across_restarts(tmp_path):
    path = tmp_path / "unit.yaml"
    write_manifest_file(manifest(), path)
    first = BootstrapProcess(path, tmp_path / "boot.key")
    peer_id = first.peer_id
    first.stop()
    second = BootstrapProcess(path, tmp_path / "boot.key")
    try:
        assert second.peer_id == peer_id
        assert (tmp_path / "boot.key").stat().st_mode & 0o077 == 0
    finally:
        second.stop()


def test_joining_works_while_one_of_several_initial_peers_is_alive(swarm):
    dead = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWPMGeYauVRuNQLfQFUzhUUDMG1bjoY8GwNhmrMBM28Hk5"
    late = DhtPeer(swarm["path"], [dead, *swarm["boot"].maddrs])
    try:
        assert late.call("read", family="claims")["records"]
    finally:
        late.stop()


def test_join_with_no_live_initial_peer_fails_naming_every_peer(swarm):
    dead = [f"/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooWPMGeYauVRuNQLfQFUzhUUDMG1bjoY8GwNhmrMBM28Hk5" for port in (1, 2)]
    import sys

    args = [sys.executable, "-m", "node.cli", "bootstrap", "--swarm", str(swarm["path"]), "--port", "0",
            "--host", "127.0.0.1", "--identity", str(swarm["tmp"] / "lonely.key")]
    for address in dead:
        args += ["--initial-peers", address]
    process = LineProcess(args, env=child_env(COLUMNS="400"))
    assert process.proc.wait(60) == 1
    output = "".join(process.output)
    assert "none of the initial peers answered" in output
    assert all(address in output for address in dead)


# --- replays, squatters and floods ---------------------------------------------------------------
def _checkpoints_seen(swarm, cluster=1):
    return [[decode_record(bytes.fromhex(r)) for r in peer.call("read", family="checkpoints", cluster=cluster)["records"]]
            for peer in swarm["peers"]]


def _adversary_stores_record(swarm, record, expiration=None):
    from protocol.policy import key_for_record

    swarm["adversary"].call("store_raw", key=key_for_record(record), subkey=record.signer, value=record.encode().hex(),
                            expiration=record.expires_at if expiration is None else expiration)


@pytest.fixture(scope="module")
def replay_victim(swarm):
    """A trainer's old (step 40) and newer (step 80) checkpoint records; the newer one is published."""
    trainer = Identity.generate()
    now = time.time()
    old = CheckpointRecord(**checkpoint_fields(swarm["manifest"], step=40, created_at=now - 30,
                                               expires_at=now + 570)).signed_by(trainer)
    new = CheckpointRecord(**checkpoint_fields(swarm["manifest"], step=80, created_at=now,
                                               expires_at=now + 600)).signed_by(trainer)
    swarm["peers"][0].call("publish", record=new.encode().hex())
    return trainer, old, new


def _steps_of(seen, signer):
    return [[r.step for r in records if r.signer == signer] for records in seen]


def test_replayed_old_checkpoint_record_does_not_roll_the_job_back(swarm, replay_victim):
    trainer, old, new = replay_victim
    _adversary_stores_record(swarm, old)  # the same bytes and signature, replayed
    _adversary_stores_record(swarm, old, expiration=new.expires_at + 60)  # and made to look newer to hivemind
    assert _steps_of(_checkpoints_seen(swarm), trainer.signer_id) == [[80], [80], [80]]


def test_replayed_record_with_a_newer_timestamp_is_refused_for_its_broken_signature(swarm, replay_victim):
    trainer, old, new = replay_victim
    bumped = dataclasses.replace(old, created_at=time.time(), expires_at=new.expires_at + 60)  # keeps old's signature
    _adversary_stores_record(swarm, bumped)
    assert _steps_of(_checkpoints_seen(swarm), trainer.signer_id) == [[80], [80], [80]]
    assert all(peer.call("stats")["refused"].get("BadSignature", 0) > 0 for peer in swarm["peers"])


@pytest.mark.parametrize("kind", ["checkpoint", "provider"])
def test_far_future_squat_of_any_record_kind_is_refused_by_every_honest_peer(swarm, kind):
    squatter, far = Identity.generate(), time.time() + 365 * 24 * 3600
    m = swarm["manifest"]
    if kind == "checkpoint":
        record = CheckpointRecord(**checkpoint_fields(m, cluster=2, expires_at=far)).signed_by(squatter)
        seen = lambda peer: peer.call("read", family="checkpoints", cluster=2)["records"]  # noqa: E731
    else:
        blob = BlobRef.of(1000, "cd" * 32)
        record = ProviderRecord(m.swarm_id, blob, swarm["adversary"].peer_id, (), far).signed_by(squatter)
        seen = lambda peer: peer.call("read", family="providers", ref=blob.to_wire())["records"]  # noqa: E731
    _adversary_stores_record(swarm, record)
    assert [seen(peer) for peer in swarm["peers"]] == [[], [], []]


def test_flood_of_valid_claims_from_fresh_identities_keeps_reads_bounded_and_honest_claims_visible(swarm):
    flood = swarm["adversary"].call("flood", timeout=300, family="claims", count=3000)
    assert flood["stored"] == 3000
    honest = _claim(swarm["manifest"], swarm["peers"][0].peer_id, signer=Identity.generate())
    swarm["peers"][0].call("publish", record=honest.encode().hex())  # confirmed by reading the flooded key back
    for peer in swarm["peers"]:
        reply = peer.call("read", timeout=120, family="claims")
        assert len(reply["records"]) >= 3000
        assert honest.encode().hex() in reply["records"]
        again = peer.call("read", timeout=120, family="claims")  # the flood's signatures are checked once
        assert again["seconds"] < 15.0


def test_flood_of_valid_checkpoint_records_past_the_key_cap_leaves_the_honest_record_visible(swarm):
    # hivemind answers a read with a key's whole dictionary; past its message limit (~9,000 records) a
    # reader sees nothing at all. Every honest peer holds at most MAX_SUBKEYS_PER_KEY entries per
    # checkpoint key, keeping what it had: the honest trainer's record first, then the flood up to the cap.
    m, trainer = swarm["manifest"], Identity.generate()
    honest = CheckpointRecord(**checkpoint_fields(m, cluster=0)).signed_by(trainer)
    swarm["peers"][0].call("publish", record=honest.encode().hex())
    swarm["adversary"].call("flood", timeout=300, family="checkpoints", count=MAX_SUBKEYS_PER_KEY + 150,
                            options={"cluster": 0})
    key = checkpoint_key(m.swarm_id, 0)
    held = [peer.call("stored_here", key=key)["entries"] for peer in swarm["peers"]]
    assert max(held) == MAX_SUBKEYS_PER_KEY  # the flood reached honest storage and stopped at the cap
    for peer in swarm["peers"]:
        # the flooder's own node may answer with everything; the readers merge it with the honest answers
        reply = peer.call("read", timeout=120, family="checkpoints", cluster=0)
        assert honest.encode().hex() in reply["records"]
    # the trainer renews its entry under the full key (publish confirms it by reading it back)
    renewed = CheckpointRecord(**checkpoint_fields(m, cluster=0, step=200)).signed_by(trainer)
    swarm["peers"][1].call("publish", record=renewed.encode().hex())
    assert renewed.encode().hex() in swarm["peers"][2].call("read", family="checkpoints", cluster=0)["records"]
