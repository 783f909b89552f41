"""A discrete-event simulation of a swarm at internet scale (`benchmarks/swarm_sim.py` runs it).

- `events`: the event queue (simulated seconds, never real sleeps) and the latency/loss model;
- `dht`: a model of hivemind's record store (per-subkey latest-expiration-wins, expiry, a value
  visible once its store completes) that counts every read and store a peer makes and its bytes,
  with sizes taken from real signed records (`protocol.records`);
- `swarm`: peers that join, claim, renew, check coverage, move, checkpoint, mirror and leave by the
  node's own rules, imported from `node.swarm.leases`, `node.swarm.announcer` and
  `node.checkpoints.acceptance`; only the sequencing (what a node does when) is written here.
"""
