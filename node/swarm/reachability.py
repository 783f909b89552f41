"""Can other peers dial this one? How a node is reached, and the check made at start (as Petals does).

A peer that others cannot dial (behind a home router's NAT, no port forwarded) must not be a DHT
server: it would sit in routing tables, and every peer that tries it waits for a timeout. So:

1. `probe_reachability` starts a throwaway libp2p host listening where the node will listen,
   joins the initial peers and asks up to `MAX_ASKED` of them, over `DIAL_BACK_PROTOCOL`, to dial
   back its TCP ports. A `DialBackService` (on every node and the bootstrap peer) dials only the IP
   address the asker's connection came from, never an address the asker names (no peer can use it
   to make others dial a third party), and calls a port open when it speaks libp2p's multistream
   header. Reachable: at least half of the peers that answered reached a port.
2. A reachable node runs as a DHT server and a circuit relay for others (p2pd's relay v2 service
   with its limits: 128 reservations, 16 circuits per peer, 4 GiB and 30 min per circuit). An
   unreachable one joins in client mode (it stores no DHT keys) and reserves a slot on its initial
   peers as relays (auto-relay), so its blobs stay fetchable; reachable mirrors copy them too.

`NetworkOptions` holds what an operator can say about it; `p2p_options` turns them into hivemind's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from hivemind.utils.multiaddr import Multiaddr

from node.blobs.stream import close_quietly
from protocol.encoding import canonical_decode, canonical_encode
from protocol.errors import InvalidRecord
from protocol.limits import PROTOCOL_VERSION

logger = logging.getLogger("ddm_swarm.reachability")

DIAL_BACK_PROTOCOL = f"/ddm-swarm/dial-back/{PROTOCOL_VERSION}"
MAX_ASKED = 5
MAX_PORTS = 4
MAX_MESSAGE_BYTES = 256
DIAL_TIMEOUT_S = 3.0
MULTISTREAM = b"/multistream/1.0.0\n"
REACHABILITY = ("auto", "public", "private")


@dataclass
class NetworkOptions:
    """How a peer is reached (command-line options of `node` and `bootstrap`)."""

    announce: List[str] = field(default_factory=list)  # multiaddrs to announce (/ip4, /ip6, /dns4 …)
    reachability: str = "auto"  # "auto": check at start; "public" / "private": the operator knows
    relay: bool = True  # dial peers through circuit relays where needed
    auto_relay: Optional[bool] = None  # reserve a slot on a relay; None: when unreachable
    relay_service: Optional[bool] = None  # relay for others; None: when reachable
    nat_traversal: bool = True  # AutoNAT and, with it, hole punching (DCUtR)
    port_map: bool = False  # UPnP / NAT-PMP on the local router: off unless asked (it multicasts)
    direct_port: Optional[int] = 0  # blobs over direct TCP on this port (0: any free); None: off

    def __post_init__(self) -> None:
        if self.reachability not in REACHABILITY:
            raise ValueError(f"reachability must be one of {REACHABILITY}, got {self.reachability!r:.20}")


def listen_maddrs(host: str, port: int) -> List[str]:
    """Where p2pd listens: `host` (an IPv4 or IPv6 literal), plus IPv6's `::` next to `0.0.0.0`
    where this machine has IPv6."""
    if ":" in host:
        return [f"/ip6/{host}/tcp/{port}"]
    maddrs = [f"/ip4/{host}/tcp/{port}"]
    if host == "0.0.0.0" and _has_ipv6():
        maddrs.append(f"/ip6/::/tcp/{port}")
    return maddrs


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


# The relay service's limits (p2pd flags): generous enough for a checkpoint, bounded per peer.
RELAY_LIMITS = dict(relayMaxReservations=128, relayMaxCircuits=16, relayDataLimit=4 << 30, relayTimeLimit="30m")


def p2p_options(network: NetworkOptions, host: str, port: int, *, reachable: bool) -> Tuple[dict, dict]:
    """hivemind DHT/P2P keyword arguments for a peer that is (or is not) reachable, and the p2pd
    flags hivemind has no argument for (see `extra_p2pd_flags`)."""
    auto_relay = (not reachable) if network.auto_relay is None else network.auto_relay
    options = dict(host_maddrs=listen_maddrs(host, port), use_relay=network.relay, nat_port_map=network.port_map,
                   auto_nat=network.nat_traversal, use_auto_relay=auto_relay)
    flags: dict = {}
    relay_service = reachable if network.relay_service is None else network.relay_service
    # p2pd's relay service starts only once the host believes it is public (AutoNAT, or forced)
    if relay_service and reachable:
        options["force_reachability"] = "public"
        flags.update(relayService=True, **RELAY_LIMITS)
    else:
        flags["relayService"] = False
        if not reachable:
            options["force_reachability"] = "private"
    if auto_relay:  # static relays (the initial peers) reserve a slot at once; discovery waits minutes first
        flags["relayDiscovery"] = False
    if network.announce:
        options["announce_maddrs"] = list(network.announce)
    return options, flags


@contextmanager
def extra_p2pd_flags(flags: dict) -> Iterator[None]:
    """Start p2pd with `flags` too (`-name=value`), in this process, while inside. hivemind builds
    the daemon's command line in `P2P._make_process_args` and has no argument for these."""
    from hivemind.p2p import P2P

    original = P2P.__dict__["_make_process_args"]
    make = original.__func__

    def with_flags(*args, **kwargs):
        return make(*args, **{**kwargs, **flags})

    P2P._make_process_args = staticmethod(with_flags)
    try:
        yield
    finally:
        P2P._make_process_args = original


async def dial_through_relay(p2p, peer, relay_maddr: str, timeout: float = 10.0) -> bool:
    """Connect to `peer` (a PeerID) through the circuit relay at `relay_maddr` (".../p2p/<relay id>").
    The circuit address is encoded here: hivemind's multiaddr writes /p2p/ values as CIDs, which
    p2pd's parser refuses inside a circuit address."""
    from hivemind.p2p import PeerID

    relay = Multiaddr(relay_maddr)
    relay_id = PeerID.from_base58(relay.value_for_protocol("p2p"))
    head = relay.decapsulate(Multiaddr(f"/p2p/{relay_id.to_base58()}")).to_bytes()
    multihash = relay_id.to_bytes()
    circuit = _RawMultiaddr(head + _varint(P2P_CODE) + _varint(len(multihash)) + multihash + _varint(CIRCUIT_CODE))
    try:
        await asyncio.wait_for(p2p._client.connect(peer, [circuit]), timeout)
        return True
    except Exception as error:  # no reservation there, relay gone, limits hit: try another relay
        logger.debug(f"no circuit to {peer} through {relay_maddr}: {error}")
        return False


P2P_CODE, CIRCUIT_CODE = 0x01A5, 0x0122


class _RawMultiaddr:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def to_bytes(self) -> bytes:
        return self.raw


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# ---- the answering side -------------------------------------------------------------------------------
class DialBackService:
    """Answers `DIAL_BACK_PROTOCOL`: dials the asker's ports at the IP its connection came from."""

    def __init__(self) -> None:
        self._p2p = None
        self._busy = 0

    async def start(self, p2p) -> None:
        await p2p.add_binary_stream_handler(DIAL_BACK_PROTOCOL, self._handle)
        self._p2p = p2p

    async def stop(self) -> None:
        if self._p2p is not None:
            await self._p2p.remove_binary_stream_handler(DIAL_BACK_PROTOCOL)
            self._p2p = None

    async def _handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._busy >= 8:  # each check dials out: a burst of askers waits for the next start
                return
            self._busy += 1
            request = await _read_message(reader)
            ports = request.get("ports") if isinstance(request, dict) else None
            if not isinstance(ports, list) or not 0 < len(ports) <= MAX_PORTS \
                    or not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
                return
            host = await connected_ip(self._p2p, info.peer_id)
            answered = [] if host is None else [p for p in ports if await _speaks_libp2p(host, p)]
            await _write_message(writer, {"tested": host is not None, "answered": answered})
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, InvalidRecord):
            pass
        finally:
            self._busy = max(0, self._busy - 1)
            close_quietly(writer)


async def _speaks_libp2p(host: str, port: int) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), DIAL_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError):
        return False
    try:  # a libp2p listener opens with multistream-select's header as soon as it is dialed
        writer.write(bytes([len(MULTISTREAM)]) + MULTISTREAM)
        first = await asyncio.wait_for(reader.read(64), DIAL_TIMEOUT_S)
        return MULTISTREAM in first
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        close_quietly(writer)


async def connected_ip(p2p, peer) -> Optional[str]:
    """The IP address of a direct (not relayed) connection p2pd has to `peer`, if any."""
    for info in await p2p.list_peers():
        if info.peer_id != peer:
            continue
        for maddr in info.addrs:
            if "p2p-circuit" in str(maddr):
                continue
            for proto in ("ip4", "ip6"):
                try:
                    return maddr.value_for_protocol(proto)
                except Exception:
                    continue
    return None


# ---- the asking side ----------------------------------------------------------------------------------
@dataclass
class Reachability:
    """The outcome of a check: `reachable`, and what each asked peer said (peer id -> answer)."""

    reachable: bool
    answers: Dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        said = "; ".join(f"{peer[-8:]}: {answer}" for peer, answer in self.answers.items()) or "nobody was asked"
        return ("reachable" if self.reachable else "not reachable") + f" ({said})"


async def ask_dial_back(p2p, peers: Sequence, ports: Sequence[int], timeout: float = 10.0) -> Reachability:
    """Ask `peers` (hivemind PeerIDs) to dial `ports` back; reachable if >= half of those that
    answered reached one."""
    answers: Dict[str, str] = {}
    reached = 0

    async def ask(peer) -> None:
        nonlocal reached
        name = peer.to_base58()
        try:
            _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, DIAL_BACK_PROTOCOL),
                                                       timeout)
            try:
                await _write_message(writer, {"ports": list(ports)[:MAX_PORTS]})
                answer = await asyncio.wait_for(_read_message(reader), timeout)
            finally:
                close_quietly(writer)
        except Exception as error:  # an old peer, a gone one: it does not count either way
            answers[name] = f"no answer ({type(error).__name__})"
            return
        if not isinstance(answer, dict) or not answer.get("tested"):
            answers[name] = "could not test"
            return
        opened = [p for p in answer.get("answered", []) if p in ports]
        answers[name] = f"reached port {opened[0]}" if opened else "could not dial back"
        reached += bool(opened)

    await asyncio.gather(*[ask(peer) for peer in list(peers)[:MAX_ASKED]])
    tested = sum(1 for a in answers.values() if a.startswith(("reached", "could not dial")))
    return Reachability(tested > 0 and reached * 2 >= tested, answers)


async def probe_reachability(initial_peers: Sequence[str], host: str, port: int,
                             network: NetworkOptions) -> Reachability:
    """Start a throwaway libp2p host where the node will listen and ask the initial peers to dial it.
    With no initial peers (the swarm's first peer) or a forced answer, no check is made."""
    from hivemind.p2p import P2P, PeerID

    if network.reachability != "auto":
        return Reachability(network.reachability == "public", {"operator": f"--reachability {network.reachability}"})
    if not initial_peers:
        return Reachability(True, {"self": "no initial peers: this is the swarm's first peer"})
    try:
        probe = await P2P.create(initial_peers=list(initial_peers), host_maddrs=listen_maddrs(host, port),
                                 nat_port_map=False, auto_nat=False, use_relay=False)
    except Exception as error:  # no initial peer answers: joining fails next, with the message for that
        return Reachability(True, {"probe": f"not checked ({type(error).__name__})"})
    try:
        ports = sorted({int(m.value_for_protocol("tcp")) for m in await probe.get_visible_maddrs()})
        peers = [PeerID.from_base58(Multiaddr(m).value_for_protocol("p2p")) for m in initial_peers]
        return await ask_dial_back(probe, list(dict.fromkeys(peers)), ports)
    finally:
        await probe.shutdown()


async def _write_message(writer: asyncio.StreamWriter, value: dict) -> None:
    body = canonical_encode(value)
    writer.write(len(body).to_bytes(4, "big") + body)
    await asyncio.wait_for(writer.drain(), 5.0)


async def _read_message(reader: asyncio.StreamReader) -> object:
    length = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 10.0), "big")
    if length > MAX_MESSAGE_BYTES:
        raise InvalidRecord(f"dial-back message of {length} bytes")
    body = await asyncio.wait_for(reader.readexactly(length), 10.0)
    return canonical_decode(body, max_bytes=MAX_MESSAGE_BYTES, what="dial-back message")
