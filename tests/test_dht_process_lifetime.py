"""The DHT process a node starts (hivemind's child, detached into its own session, plus its p2pd)
ends with the node, even when the node is SIGKILLed while that DHT is still starting. An orphan
would keep answering for a dead node and hold its libp2p identity, so that its restart is refused
("identity ... is already taken by another peer").
"""

import sys
from pathlib import Path

import pytest

from tests.swarm_harness import ROOT, LineProcess, wait_until

pytestmark = pytest.mark.timeout(120)

JOINING = """
import sys
from node.swarm.membership import SwarmMembership
from node.swarm.manifest_files import read_manifest_file
from protocol.identity import Identity
print("joining", flush=True)
SwarmMembership(read_manifest_file(sys.argv[1]), Identity.generate(), p2p_identity_path=sys.argv[2])
print("joined", flush=True)
"""


def processes_naming(marker: str) -> list:
    """Pids of live processes whose command line contains `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def test_dht_process_and_p2pd_end_when_the_node_is_killed_while_the_dht_starts(tmp_path):
    key = str(tmp_path / "p2p.key")  # named on the command line of the node, its forked DHT process and p2pd
    node = LineProcess([sys.executable, "-c", JOINING, str(ROOT / "tests" / "manifests" / "tiny.yaml"), key])
    try:
        node.wait_for(lambda line: line.startswith("joining"), timeout=60)
        # p2pd is up: the DHT process is in the middle of its start-up, the node waits for it
        wait_until(lambda: len(processes_naming(f"-id={key}")) > 0, 60, "p2pd to start", every=0.02)
        assert node.alive() and "joined\n" not in node.output
    finally:
        node.kill()
    wait_until(lambda: not processes_naming(key), 15, "the DHT process and p2pd of the killed node to end", every=0.2)
