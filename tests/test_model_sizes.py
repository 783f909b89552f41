"""Named DiT sizes and the LAION-Aesthetics manifests: they validate and their models build on the
meta device at the parameter counts of the papers (fast: no weights are allocated)."""

from pathlib import Path

import pytest
import torch
import yaml

from ddm_models.configs import (DIT_PATCHES, DIT_SHAPES, EXPERT_SIZES, ROUTER_SIZES, DiT_B_2, DiT_XL_2,
                                InvalidConfig, router_config)
from ddm_models.model_sizes import (format_model_sizes, manifest_model_sizes, parameters_on_meta, swarm_model_sizes,
                                    swarm_parameters)
from ddm_models.router import build_router
from protocol.manifest import SwarmManifest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _manifest(name):
    return SwarmManifest.from_dict(yaml.safe_load((CONFIGS / name).read_text()))


def _sizes(manifest):
    return manifest_model_sizes(manifest)


def test_every_dit_shape_comes_with_patches_2_4_and_8_under_the_papers_names():
    for shape, (width, depth, heads) in DIT_SHAPES.items():
        for patch in DIT_PATCHES:
            config = EXPERT_SIZES[f"DiT-{shape}/{patch}"]
            assert (config.width, config.depth, config.heads, config.patch_size) == (width, depth, heads, patch)
            assert config.image_shape == (4, 32, 32)
    assert (DIT_SHAPES["S"], DIT_SHAPES["B"], DIT_SHAPES["L"], DIT_SHAPES["XL"]) == (
        (384, 12, 6), (768, 12, 12), (1024, 24, 16), (1152, 28, 16))


def test_named_constructors_apply_overrides_and_validate_them():
    assert DiT_XL_2(objective="ddpm").objective == "ddpm" and DiT_XL_2().width == 1152
    with pytest.raises(InvalidConfig):
        DiT_B_2(heads=7)


def test_dit_patch_size_changes_tokens_not_the_trunk():
    # only the patch embedding and output projection grow with the patch: the trunk is the same
    xl2, xl8 = parameters_on_meta(EXPERT_SIZES["DiT-XL/2"]), parameters_on_meta(EXPERT_SIZES["DiT-XL/8"])
    assert abs(xl8 - xl2) < 0.01 * xl2


def test_dit_router_decodes_a_cls_token_to_one_logit_per_cluster():
    config = router_config("DiT-S/2", num_clusters=5, width=32, depth=2, heads=2)
    logits = build_router(config)(torch.randn(3, 4, 32, 32), torch.tensor([0.0, 0.5, 1.0]))
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()


def test_laion_aesthetics_manifest_has_eight_dit_xl2_experts_of_600m_parameters_on_sd_vae_latents():
    manifest = _manifest("laion-aesthetics.yaml")
    assert manifest.vae is not None and manifest.vae.model == "stabilityai/sd-vae-ft-mse"
    assert manifest.num_clusters == 8 and manifest.clustering.fine_clusters == 1024
    expert, router = _sizes(manifest)
    assert expert.size == "DiT-XL/2" and expert.clusters == tuple(range(8))
    assert 600e6 < expert.parameters < 630e6 and expert.image_shape == (4, 32, 32)
    assert router.kind == "router" and router.size == "DiT-B/2" and 80e6 < router.parameters < 130e6
    assert 4.8e9 < swarm_parameters([expert, router]) < 5.2e9


def test_mixed_manifest_trains_two_ddpm_and_six_fm_experts():
    rows = {row.objective: row for row in _sizes(_manifest("laion-aesthetics-mixed.yaml"))}
    assert len(rows["ddpm"].clusters) == 2 and len(rows["fm"].clusters) == 6
    assert rows["ddpm"].parameters == rows["fm"].parameters


def test_model_size_table_names_every_model_and_the_total():
    table = format_model_sizes(_sizes(_manifest("laion-aesthetics-mixed.yaml")))
    assert "dit-xl-2-ddpm" in table and "router-dit-b-2" in table and "607.0M" in table and "total" in table


def test_router_sizes_include_the_dit_family():
    assert ROUTER_SIZES["DiT-B/2"].backbone == "dit" and ROUTER_SIZES["small"].backbone == "conv"


def test_a_one_cluster_swarm_lists_no_router():
    manifest = _manifest("laion-aesthetics.yaml")
    rows = swarm_model_sizes(manifest.experts, manifest.router, ["dit-xl-2-fm"])
    assert [row.kind for row in rows] == ["expert"] and rows[0].clusters == (0,)
