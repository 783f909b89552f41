"""The manifest's optional `vae` field: validated at load, part of the swarm id only when present."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from protocol.errors import InvalidManifest
from protocol.manifest import SwarmManifest

REPO = Path(__file__).resolve().parents[1]


def _tiny(**extra):
    return {**yaml.safe_load((REPO / "tests/manifests/tiny.yaml").read_text()), **extra}


def test_manifests_without_a_vae_keep_the_swarm_ids_they_had_before_the_field_existed():
    # ids of protocol version 2 computed before `vae` was added (the field, absent, changes nothing);
    # the version is part of what the id hashes, so the same manifests at version 2 must hash to them
    tiny = SwarmManifest.from_dict(_tiny())
    assert dataclasses.replace(tiny, protocol_version=2).swarm_id == \
        "797009867c310be7b0ea55574ddc169e6a26832a77c258be95957827858cbfc5"
    local = SwarmManifest.from_dict(yaml.safe_load((REPO / "configs/local.yaml").read_text()))
    assert local.vae is None and dataclasses.replace(local, protocol_version=2).swarm_id == \
        "d37110440131acd169db856f0379455281757d4bef2c0728459dad24d81471a5"
    assert tiny.swarm_id != dataclasses.replace(tiny, protocol_version=2).swarm_id  # version 3: another swarm


def test_a_vae_is_part_of_the_swarm_id_and_survives_a_round_trip():
    plain = SwarmManifest.from_dict(_tiny())
    latent = SwarmManifest.from_dict(_tiny(vae={"model": "stabilityai/sd-vae-ft-mse"}))
    scaled = SwarmManifest.from_dict(_tiny(vae={"model": "stabilityai/sd-vae-ft-mse", "scaling_factor": 0.18215}))
    assert len({plain.swarm_id, latent.swarm_id, scaled.swarm_id}) == 3
    assert SwarmManifest.from_dict(scaled.to_file_dict()) == scaled
    assert scaled.vae.scaling_factor == 0.18215 and latent.vae.scaling_factor is None


@pytest.mark.parametrize("vae, field", [
    ({}, "vae.model"), ({"model": ""}, "vae.model"), ({"model": "a b"}, "vae.model"),
    ({"model": "x", "scaling_factor": 0}, "vae.scaling_factor"),
    ({"model": "x", "scaling_factor": "big"}, "vae.scaling_factor"),
    ({"model": "x", "latent": 4}, "vae.latent"), ("stabilityai/sd-vae-ft-mse", "vae"),
])
def test_a_malformed_vae_is_refused_naming_the_field(vae, field):
    with pytest.raises(InvalidManifest, match=field.replace(".", r"\.")):
        SwarmManifest.from_dict(_tiny(vae=vae))
