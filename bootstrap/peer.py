"""The bootstrap peer: a long-lived DHT peer with a stable peer id that others join through.

It installs the swarm's validator like every peer, announces the swarm's name beacon, and keeps
its presence fresh. Given the swarm's shard folder (what `swarm create` wrote beside the manifest),
it seeds the data shards (`node.data.seeding`), so nodes fetch their job's shards from it. Its libp2p key lives at `--identity` (so the peer id, and hence the multiaddrs
that nodes are given, survive restarts); its ed25519 signing key next to it.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import List, Optional, Sequence

from node.data.seeding import ShardSeeder
from node.identity_files import identities_for_join
from node.swarm.membership import SwarmMembership
from node.swarm.presence import Presence
from node.network import NetworkLoop
from node.swarm.reachability import DialBackService, NetworkOptions
from protocol.manifest import SwarmManifest

logger = logging.getLogger("ddm_swarm.bootstrap")


class BootstrapPeer:
    def __init__(self, manifest: SwarmManifest, identity_path: Path, *, host: str = "0.0.0.0", port: int = 31337,
                 initial_peers: Sequence[str] = (), network: Optional[NetworkOptions] = None,
                 shards: Optional[Path] = None):
        # the swarm's public entry point: a DHT server and a relay for peers behind NATs (p2pd's limits)
        network = network or NetworkOptions()
        if network.reachability == "auto":
            network.reachability = "public"
        identity_path = Path(identity_path)
        signer_path = identity_path.with_name(identity_path.name + ".signer.pem")
        with identities_for_join(signer_path, identity_path) as (signer, p2p_key):
            self.membership = SwarmMembership(manifest, signer, initial_peers=initial_peers, host=host, port=port,
                                              p2p_identity_path=p2p_key, network=network, reachable=network.reachability == "public")
        if not manifest.trust.allows(signer.signer_id):  # it still routes and relays; its records are refused
            logger.warning(f"this bootstrap's signer {signer.signer_id} is not in swarm '{manifest.name}''s "
                           f"allow-list: every peer refuses its presence records (and the shards it seeds are "
                           f"found only through the manifest's URLs). Add it to trust.signers ({signer_path}).")
        self.presence = Presence(self.membership, role="bootstrap")
        # joining nodes ask it whether they can be dialed back (node.swarm.reachability)
        self.loop = NetworkLoop()
        self._p2p = self.loop.run(self.membership.dht.replicate_p2p(), timeout=60)
        self.dial_back = DialBackService()
        self.loop.run(self.dial_back.start(self._p2p), timeout=60)
        self._stop = threading.Event()
        self.seeder: Optional[ShardSeeder] = None
        if shards is not None:
            try:
                self.seeder = ShardSeeder(self.membership, self.presence, shards, identity_path.with_name(
                    identity_path.name + ".blobs"))
            except BaseException:
                self.membership.shutdown()
                raise

    @property
    def maddrs(self) -> List[str]:
        return self.membership.maddrs

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM, renewing the beacon and presence every lease period."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        period = self.membership.manifest.timing.lease_s
        try:
            while not self._stop.is_set():
                try:
                    self.membership.announce_beacon()
                    self.presence.announce("online")
                except Exception as error:  # a transient DHT hiccup must not take the bootstrap down
                    logger.warning(f"announcement failed, retrying in {period:.0f} s: {error}")
                self._stop.wait(period)
        finally:
            self.close()

    def close(self) -> None:
        """Leave the swarm: stop seeding, a tombstone for the presence record, then the DHT down."""
        if self.seeder is not None:
            self.seeder.stop()
        self.presence.leave()
        self.loop.run(self.dial_back.stop(), timeout=10)
        self.loop.stop()
        self.membership.shutdown()
