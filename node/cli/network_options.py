"""Command-line options saying how a peer is reached, shared by `node` and `bootstrap`."""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import typer

from node.errors import NodeError

if TYPE_CHECKING:  # imported where used: it brings hivemind, which a command that fails early never needs
    from node.swarm.reachability import NetworkOptions

AnnounceOption = typer.Option(None, "--announce", help="Multiaddr to announce to other peers, e.g. "
                              "/ip4/203.0.113.7/tcp/31337, /ip6/2001:db8::7/tcp/31337 or /dns4/host.example/tcp/31337 "
                              "(repeat; an explicit port, the one forwarded to this machine).")
ReachabilityOption = typer.Option("auto", help="auto: ask peers at start whether they can dial this one back; "
                                  "public / private: skip the check (private joins the DHT as a client).")
RelayOption = typer.Option(True, help="Reach peers behind NATs through circuit relays.")
AutoRelayOption = typer.Option(None, help="Reserve a slot on a relay so that others can reach this peer "
                               "(default: when it is not reachable).")
RelayServiceOption = typer.Option(None, help="Relay for peers behind NATs, with p2pd's limits (default: when reachable).")
NatTraversalOption = typer.Option(True, help="AutoNAT and hole punching (DCUtR).")
PortMapOption = typer.Option(False, help="Ask the local router for a port mapping (UPnP / NAT-PMP; multicasts on the LAN).")
DirectPortOption = typer.Option(0, help="TCP port serving blobs directly, next to p2p (0: any free one; -1: off).")


def network_options(announce: Optional[List[str]], reachability: str, relay: bool, auto_relay: Optional[bool],
                    relay_service: Optional[bool], nat_traversal: bool, port_map: bool,
                    direct_port: int = 0) -> NetworkOptions:
    """The options as given, checked: every --announce must be a multiaddr with an explicit port."""
    from hivemind.utils.multiaddr import Multiaddr

    from node.swarm.reachability import REACHABILITY, NetworkOptions

    if reachability not in REACHABILITY:
        raise NodeError(f"--reachability must be one of {', '.join(REACHABILITY)}, not {reachability!r:.20}")
    for address in announce or ():
        try:
            maddr = Multiaddr(address)
            port = maddr.value_for_protocol("tcp")
        except Exception:
            raise NodeError(f"--announce {address!r:.80} is not a multiaddr like /ip4/203.0.113.7/tcp/31337") from None
        if not any(proto in address for proto in ("/ip4/", "/ip6/", "/dns4/", "/dns6/", "/dns/")) or port == "0":
            raise NodeError(f"--announce {address!r:.80} needs an /ip4, /ip6 or /dns4 address and an explicit port")
    return NetworkOptions(announce=list(announce or ()), reachability=reachability, relay=relay, auto_relay=auto_relay,
                          relay_service=relay_service, nat_traversal=nat_traversal, port_map=port_map,
                          direct_port=None if direct_port < 0 else direct_port)
