"""The ensemble recipe: hyper-parameters as validated data, and how the time budget is shared."""

import pytest

from ddm_models.configs import InvalidConfig, expert_config_from_spec, router_config_from_spec
from ddm_models.recipe import EMBEDDED_RECIPE, EnsembleRecipe
from ddm_models.train_ensemble import plan_jobs


def test_recipe_round_trips_through_a_plain_dict():
    assert EnsembleRecipe.from_dict(EMBEDDED_RECIPE.to_dict()) == EMBEDDED_RECIPE


def test_recipe_fields_left_out_keep_the_embedded_defaults():
    recipe = EnsembleRecipe.from_dict({"objectives": ["fm", "ddpm"], "expert_training": {"lr": 5e-4},
                                       "expert": {"depth": 3}})
    assert recipe.expert_config(1).objective == "ddpm" and recipe.expert_config(2).objective == "fm"
    assert recipe.expert_training.lr == 5e-4
    assert recipe.expert_training.batch_size == EMBEDDED_RECIPE.expert_training.batch_size
    assert recipe.expert.depth == 3 and recipe.expert.width == EMBEDDED_RECIPE.expert.width


@pytest.mark.parametrize("bad", [{"objectives": ["score"]}, {"workers": 0}, {"expert_training": {"lr": -1.0}},
                                 {"router": {"num_clusters": 3}}, {"learning_rate": 1.0}, {"expert": {"depth": "6"}}])
def test_bad_recipes_are_refused(bad):
    with pytest.raises(InvalidConfig):
        EnsembleRecipe.from_dict(bad)


def test_every_worker_gets_the_whole_budget_and_the_router_its_share():
    plans = plan_jobs(EMBEDDED_RECIPE, 600.0)
    assert len(plans) == EMBEDDED_RECIPE.workers
    assert all(sum(seconds for _, _, seconds in plan) == pytest.approx(600.0) for plan in plans)
    router = [job for plan in plans for job in plan if job[0] == "router"]
    assert len(router) == 1 and router[0][2] == pytest.approx(EMBEDDED_RECIPE.router_share * 2 * 600.0)
    experts = sorted(job[1] for plan in plans for job in plan if job[0] == "expert")
    assert experts == list(range(EMBEDDED_RECIPE.num_clusters))


def test_manifest_model_specs_become_configs():
    config = expert_config_from_spec("ddpm", {"size": "tiny", "depth": 3})
    assert (config.objective, config.depth, config.width) == ("ddpm", 3, 96)
    assert router_config_from_spec({"size": "small", "use_text": False}, 4).use_text is False
    with pytest.raises(InvalidConfig):
        expert_config_from_spec("fm", {"size": "huge"})


def test_the_local_swarm_manifest_trains_with_the_recipe_settings():
    from importlib import resources

    import yaml

    manifest = yaml.safe_load((resources.files("configs") / "local.yaml").read_text())
    fm = next(spec for spec in manifest["experts"] if spec["objective"] == "fm")
    assert fm["architecture"] == {"size": "tiny"}
    recipe = EMBEDDED_RECIPE
    assert {k: getattr(recipe.expert_training, k) for k in fm["training"]} == fm["training"]
    assert {k: getattr(recipe.router_training, k) for k in manifest["router"]["training"]} == manifest["router"]["training"]
    assert manifest["sampling"]["guidance"] == recipe.guidance_scale
    assert manifest["sampling"]["steps"] == recipe.sample_steps
