"""A node of two training processes (`ddm-swarm node --gpus 2`; on this CPU-only machine two CPU
ranks with gloo) end to end against a real bootstrap peer: it trains one expert with DDP, rank 0
announces the checkpoint, a Ctrl-C stops both ranks, and a one-process node resumes that checkpoint.
A rank that dies stops the whole node (exit 1, one line naming the lost rank); its claim is not held
after. (Whether the lease is released or ran out first depends on how fast the loss is seen.)
On this loaded machine the module takes 2-5 minutes, most of it three node start-ups."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from node.identity_files import load_or_create_identity
from node.trainer.ranks import end_stuck_follower
from protocol.records import decode_record
from tests.swarm_harness import ROOT, BootstrapProcess, DhtPeer, NodeProcess, wait_until

pytestmark = pytest.mark.timeout(300)
TINY = ROOT / "tests" / "manifests" / "tiny.yaml"
BATCH = 32  # tiny.yaml's expert batch size, per rank
EVERY = 40  # tiny.yaml's checkpoint_every_steps


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    boot = BootstrapProcess(TINY, tmp / "boot.key")
    observer = DhtPeer(TINY, boot.maddrs)
    started = []
    yield {"tmp": tmp, "peers": boot.maddrs, "observer": observer, "started": started}
    for process in [*started, observer, boot]:
        process.kill()


def checkpoints_of(swarm, cluster: int, signer: str):
    reply = swarm["observer"].call("read", family="checkpoints", cluster=cluster)
    return [r for r in map(decode_record, map(bytes.fromhex, reply["records"])) if r.signer == signer]


def claims(swarm):
    reply = swarm["observer"].call("read", family="claims")
    return [decode_record(bytes.fromhex(hex_)) for hex_ in reply["records"]]


def follower_pids(node: NodeProcess):
    """Processes of the node's session that are follower ranks (`python -m node.trainer.ranks`)."""
    listing = subprocess.run(["ps", "-o", "pid=,sid=,stat=,args=", "-e"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if line.split()[1:2] == [str(node.proc.pid)]
            and not line.split()[2].startswith("Z") and "node.trainer.ranks" in line]


def node_summary(node: NodeProcess) -> dict:
    lines = [line for line in node.output if line.startswith('{"node_summary"')]
    assert lines, "".join(node.output)[-3000:]
    return json.loads(lines[-1])["node_summary"]


def start_node(swarm, name: str, job: str, *extra: str) -> NodeProcess:
    node = NodeProcess(TINY, swarm["tmp"] / name, swarm["peers"], "--job", job, "--threads", "1",
                       "--device", "cpu", "--no-mirror", *extra)
    swarm["started"].append(node)
    return node


def test_two_rank_node_announces_a_checkpoint_that_a_one_rank_node_resumes(swarm):
    signer = load_or_create_identity(swarm["tmp"] / "a" / "identity.pem").signer_id
    node = start_node(swarm, "a", "expert/0", "--gpus", "2", "--max-steps", str(EVERY))
    wait_until(lambda: follower_pids(node), 60, "the node's second rank")
    first = wait_until(lambda: checkpoints_of(swarm, 0, signer), 150, "the two-rank node's checkpoint")[0]
    assert first.step == EVERY
    assert first.samples_seen == EVERY * BATCH * 2  # both ranks' batches went into every step
    node.wait_for(lambda line: "still serving" in line, timeout=60)
    wait_until(lambda: not follower_pids(node), 30, "the second rank to leave once the budget is spent")
    node.interrupt()  # Ctrl-C
    assert node.proc.wait(60) == 0, "".join(node.output)[-3000:]
    assert node_summary(node)["images"] == EVERY * BATCH * 2

    resumed = start_node(swarm, "a", "expert/0", "--max-steps", str(2 * EVERY), "--exit-when-done")
    assert resumed.proc.wait(150) == 0, "".join(resumed.output)[-3000:]
    assert f"resumed expert/0 from this node's own state at step {EVERY}" in "".join(resumed.output)
    second = wait_until(lambda: [r for r in checkpoints_of(swarm, 0, signer) if r.step == 2 * EVERY], 60,
                        "the one-rank node's checkpoint")[0]
    assert second.samples_seen == first.samples_seen + EVERY * BATCH  # one rank from there on
    assert node_summary(resumed)["images"] == EVERY * BATCH


def test_a_rank_that_dies_stops_the_node_and_its_claim_is_no_longer_held(swarm):
    signer = load_or_create_identity(swarm["tmp"] / "k" / "identity.pem").signer_id
    node = start_node(swarm, "k", "expert/1", "--gpus", "2")
    wait_until(lambda: any(c.signer == signer and str(c.job) == "expert/1" for c in claims(swarm)), 90,
               "the two-rank node's claim")
    node.wait_for(lambda line: "training" in line.lower(), timeout=60)
    [follower] = wait_until(lambda: follower_pids(node), 30, "the node's second rank")
    os.kill(follower, signal.SIGKILL)  # a crash of rank 1
    code = node.proc.wait(90)
    output = "".join(node.output)
    assert code != 0 and "training process of this node is gone" in output, output[-3000:]
    assert not [c for c in claims(swarm) if c.signer == signer and c.state == "training"]


def test_a_follower_that_ignores_being_told_to_leave_has_its_stacks_logged_and_is_killed():
    # what the node's teardown does with a follower rank that hangs after STOP (seen once in CI: rank
    # 0 waited 10 s after SIGTERM and crashed); it must end that process and go on, never raise
    follower = subprocess.Popen([sys.executable, "-c", "import faulthandler, signal, time\n"
                                 "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\n"
                                 "while True: time.sleep(0.1)"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert follower.stdout.readline() == "up\n"
    started = time.monotonic()
    end_stuck_follower(follower, grace_s=30)
    assert follower.returncode == -signal.SIGKILL and time.monotonic() - started < 30
    assert 'Current thread' in (stack := follower.stderr.read()) and 'File "<string>"' in stack  # its stacks
