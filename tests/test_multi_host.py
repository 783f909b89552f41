"""Multi-host: a bootstrap peer, two trainer nodes and a client, each in its own Linux network
namespace with its own address (10.77.0.1-4) on a bridged LAN, so every byte between them crosses
real interfaces (veth pairs) instead of loopback. Real processes started with `ip netns exec`.
The nodes train and announce; the client reads the swarm's status and fetches both experts.
Skipped where network namespaces cannot be made (not root, or `ip netns` not permitted).
"""

import json
import re

import pytest

from node.identity_files import load_identity
from protocol.hashing import blob_ref_of
from protocol.records import decode_record
from tests.network_namespaces import NamespaceLan, unavailable_reason
from tests.swarm_harness import ROOT, BootstrapProcess, NodeProcess, run_cli, wait_until

pytestmark = pytest.mark.timeout(240)
TINY = ROOT / "tests" / "manifests" / "tiny.yaml"
CHECKPOINTED = re.compile(r"ckpt step (\d+)")


@pytest.fixture(scope="module")
def lan(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"multi-host test needs network namespaces: {reason}")
    tmp = tmp_path_factory.mktemp("multi-host")
    processes = []
    with NamespaceLan(["boot", "a", "b", "client"]) as lan:
        try:
            host = lan.addresses
            boot = BootstrapProcess(TINY, tmp / "boot.key", host=host["boot"], prefix=lan.prefix("boot"))
            processes.append(boot)
            for name, job in (("a", "expert/0"), ("b", "expert/1")):
                processes.append(NodeProcess(TINY, tmp / name, boot.maddrs, "--job", job, "--no-mirror",
                                             host=host[name], prefix=lan.prefix(name)))
            yield {"lan": lan, "tmp": tmp, "boot": boot, "nodes": processes[1:]}
        finally:
            for process in processes:  # a namespace lives on while a process runs in it
                process.kill()


def client(lan, *args):
    boot = lan["boot"].maddrs
    return run_cli(*args, "--swarm", str(TINY), *sum([["--initial-peers", m] for m in boot], []),
                   prefix=lan["lan"].prefix("client"), timeout=150)


def test_bootstrap_listens_only_on_its_own_lan_address(lan):
    assert lan["boot"].maddrs and all(m.startswith("/ip4/10.77.0.1/tcp/") for m in lan["boot"].maddrs)


def test_client_on_another_host_sees_both_trainers_and_their_checkpoints(lan):
    for node in lan["nodes"]:
        node.wait_for(lambda line: CHECKPOINTED.search(line) is not None, timeout=150)

    def both_announced():
        result = client(lan, "status", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        jobs = {job["job"]: job for job in json.loads(result.stdout)["jobs"]}
        done = all(jobs[j]["claims"] == 1 and (jobs[j]["latest_step"] or 0) > 0 and jobs[j]["providers"] >= 1
                   for j in ("expert/0", "expert/1"))
        return done and jobs

    jobs = wait_until(both_announced, 60, "the client's status to show both checkpoints", every=0.5)
    signers = {load_identity(lan["tmp"] / name / "identity.pem").signer_id[:12] for name in ("a", "b")}
    assert {jobs["expert/0"]["trainers"][0], jobs["expert/1"]["trainers"][0]} == signers
    assert jobs["router"]["claims"] == 0


def test_client_on_another_host_fetches_both_experts_across_the_lan(lan):
    received = lan["lan"].received_bytes("client")
    out = lan["tmp"] / "fetched"
    result = client(lan, "fetch", "--out", str(out), "--cache-dir", str(lan["tmp"] / "client-cache"))
    assert result.returncode == 0, result.stdout + result.stderr
    saved = json.loads((out / "ensemble.json").read_text())["checkpoints"]
    records = [decode_record(bytes.fromhex(entry["record"])) for entry in saved]
    assert sorted(r.cluster for r in records) == [0, 1]
    for entry, record in zip(saved, records):
        assert blob_ref_of((out / entry["file"]).read_bytes()) == record.inference
    # the checkpoints' bytes reached the client through its own interface, from the other hosts
    assert lan["lan"].received_bytes("client") - received >= sum(r.inference.size for r in records)
