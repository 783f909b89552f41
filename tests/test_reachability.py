"""Reachability (node/swarm/reachability.py): the dial-back check between real p2pd daemons on
loopback, what an unreachable or reachable peer asks p2pd for, the --announce checks, and a
bootstrap peer on IPv6. The NAT itself is tests/test_nat.py."""

import asyncio
import json
import socket

import pytest
from hivemind.p2p import P2P

from node.cli.network_options import network_options
from node.errors import NodeError
from node.swarm.reachability import (DialBackService, NetworkOptions, ask_dial_back, listen_maddrs, p2p_options)
from tests.swarm_harness import ROOT, BootstrapProcess, run_cli

pytestmark = pytest.mark.timeout(120)
TINY = ROOT / "tests" / "manifests" / "tiny.yaml"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def ask(ports_of) -> object:
    """An answering peer with a DialBackService, an asker connected to it; ask for `ports_of(asker)`."""
    answerer = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
    service = DialBackService()
    await service.start(answerer)
    asker = await P2P.create(initial_peers=[str(m) for m in await answerer.get_visible_maddrs()],
                             host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
    try:
        return await ask_dial_back(asker, [answerer.peer_id], ports_of(await asker.get_visible_maddrs()))
    finally:
        await asker.shutdown()
        await answerer.shutdown()


def test_a_peer_whose_port_answers_with_libp2p_is_found_reachable():
    result = asyncio.run(ask(lambda maddrs: [int(maddrs[0].value_for_protocol("tcp"))]))
    assert result.reachable and "reached port" in result.describe()


def test_a_port_nobody_listens_on_is_found_unreachable():
    result = asyncio.run(ask(lambda maddrs: [closed_port()]))
    assert not result.reachable and "could not dial back" in result.describe()


def test_an_unreachable_peer_asks_for_a_relay_slot_and_never_relays_for_others():
    options, flags = p2p_options(NetworkOptions(), "0.0.0.0", 0, reachable=False)
    assert options["use_auto_relay"] and options["force_reachability"] == "private"
    assert flags["relayService"] is False and flags["relayDiscovery"] is False


def test_a_reachable_peer_relays_for_others_within_limits():
    options, flags = p2p_options(NetworkOptions(), "0.0.0.0", 31337, reachable=True)
    assert not options["use_auto_relay"] and options["force_reachability"] == "public"
    assert flags["relayService"] and flags["relayMaxCircuits"] > 0 and flags["relayMaxReservations"] > 0


def test_listening_on_every_ipv4_address_listens_on_ipv6_too_where_the_machine_has_it():
    maddrs = listen_maddrs("0.0.0.0", 4000)
    assert maddrs[0] == "/ip4/0.0.0.0/tcp/4000"
    assert listen_maddrs("::1", 5) == ["/ip6/::1/tcp/5"]
    assert len(maddrs) in (1, 2) and all(m.endswith("/tcp/4000") for m in maddrs)


@pytest.mark.parametrize("address", ["/ip4/203.0.113.7/tcp/0", "203.0.113.7:31337", "/ip4/203.0.113.7/udp/1"])
def test_an_announce_address_without_an_explicit_tcp_port_is_refused(address):
    with pytest.raises(NodeError):
        network_options([address], "auto", True, None, None, True, False)


def test_announce_addresses_on_ip4_ip6_and_dns4_are_taken():
    taken = ["/ip4/203.0.113.7/tcp/31337", "/ip6/2001:db8::7/tcp/31337", "/dns4/node.example/tcp/31337"]
    assert network_options(taken, "auto", True, None, None, True, False).announce == taken


def test_a_bootstrap_peer_on_ipv6_answers_a_client(tmp_path):
    if not socket.has_ipv6 or not listen_maddrs("0.0.0.0", 0)[1:]:
        pytest.skip("no IPv6 on this machine")
    boot = BootstrapProcess(TINY, tmp_path / "boot.key", host="::1")
    try:
        assert boot.maddrs and all(m.startswith("/ip6/::1/tcp/") for m in boot.maddrs)
        result = run_cli("status", "--json", "--swarm", str(TINY), "--initial-peers", boot.maddrs[0], timeout=90)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "jobs" in json.loads(result.stdout)
    finally:
        boot.kill()
