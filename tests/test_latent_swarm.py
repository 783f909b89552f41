"""A latent swarm end to end through the command line: a manifest naming a VAE (a tiny diffusers
`AutoencoderKL` built and saved here, loaded from its folder like any local model), a node that
fetches its shards, encodes them once to latents (cached) and trains on them, and `generate`,
which decodes the ensemble's latents to an RGB PNG."""

import pytest
import yaml
from PIL import Image

from node.swarm.manifest_files import read_manifest_file
from tests.captioned_data import write_image_folder
from tests.latent_fixtures import save_in_folder, tiny_vae
from tests.swarm_harness import BootstrapProcess, NodeProcess, run_cli

pytestmark = pytest.mark.timeout(900)


def test_a_node_trains_on_vae_latents_and_generate_decodes_them_to_rgb(tmp_path):
    vae = save_in_folder(tiny_vae(), tmp_path / "tiny-vae")  # f = 2, 4 latent channels
    manifest_path = tmp_path / "latent.yaml"
    created = run_cli("swarm", "create", "--data", str(write_image_folder(tmp_path / "photos", 48)), "--clusters", "1",
                      "--image-size", "16", "--out", str(manifest_path), "--router-samples", "16",
                      "--expert-size", "tiny", "--lease-s", "3")
    assert created.returncode == 0, created.stderr
    data = yaml.safe_load(manifest_path.read_text())
    data["vae"] = {"model": str(vae)}
    for spec in data["experts"]:  # the experts see 4x8x8 latents, not 3x16x16 pixels
        spec["architecture"] = {**(spec["architecture"] or {}), "in_channels": 4, "sample_size": 8, "patch_size": 2}
    manifest_path.write_text(yaml.safe_dump(data, sort_keys=False))  # the shards beside it stay the same
    manifest = read_manifest_file(manifest_path)
    boot = BootstrapProcess(manifest_path, tmp_path / "boot.key")
    node = NodeProcess(manifest_path, tmp_path / "n0", boot.maddrs, "--job", "expert/0", "--max-steps", "20")
    try:
        node.wait_for(lambda line: "[serving]" in line, timeout=300)
        assert list((tmp_path / "n0" / "cache" / "latents").glob("*.safetensors")), "latents are cached"
        out = tmp_path / "latent.png"
        result = run_cli("generate", "a green circle", "--num", "2", "--steps", "3", "--out", str(out),
                         "--swarm", str(manifest_path), "--initial-peers", boot.maddrs[0],
                         "--cache-dir", str(tmp_path / "gen-cache"))
        assert result.returncode == 0, result.stderr[-3000:]
        with Image.open(out) as image:
            assert image.mode == "RGB"
        assert manifest.vae is not None and manifest.dataset.kind == "shards"
    finally:
        node.kill()
        boot.kill()
