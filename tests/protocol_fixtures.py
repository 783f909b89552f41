"""Small manifests and records shared by the protocol tests."""

import time

from protocol.hashing import blob_ref_of
from protocol.manifest import SwarmManifest

PEER_ID = "12D3KooWPMGeYauVRuNQLfQFUzhUUDMG1bjoY8GwNhmrMBM28Hk5"


def manifest_dict(**overrides) -> dict:
    data = {
        "name": "unit",
        "dataset": {"kind": "small-digits", "image_size": 8, "channels": 1},
        "clustering": {"num_clusters": 4, "fine_clusters": 16},
        "experts": [
            {"name": "tiny-fm", "objective": "fm", "architecture": {"width": 64, "depth": 2}},
            {"name": "tiny-ddpm", "objective": "ddpm", "architecture": {"width": 64, "depth": 2}},
        ],
        "router": {"name": "router", "objective": "router", "architecture": {"width": 32}},
    }
    data.update(overrides)
    return data


def manifest(**overrides) -> SwarmManifest:
    return SwarmManifest.from_dict(manifest_dict(**overrides))


def checkpoint_fields(m: SwarmManifest, **overrides) -> dict:
    spec = m.expert_spec("tiny-fm")
    now = time.time()
    fields = dict(swarm_id=m.swarm_id, cluster=1, model=spec.name, objective=spec.objective,
                  spec_hash=spec.spec_hash, step=100, samples_seen=6400, heldout_loss=0.25,
                  blob=blob_ref_of(b"weights"), inference=blob_ref_of(b"bf16 weights"), parent="", created_at=now, expires_at=now + 600)
    fields.update(overrides)
    return fields
