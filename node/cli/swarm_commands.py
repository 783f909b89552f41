"""`ddm-swarm swarm show`: a swarm's manifest and id (`swarm create` is the operator's, in `bootstrap`)."""

from __future__ import annotations

from node.cli.app import SwarmOption, fail, swarm_app


@swarm_app.command("show")
def swarm_show(swarm: str = SwarmOption) -> None:
    """Print a swarm's manifest and its swarm id, after checking that every model it names builds
    (on the meta device: no memory for weights), with their parameter counts."""
    import yaml

    from node.swarm.manifest_files import load_manifest

    try:
        manifest = load_manifest(swarm)
        # only a manifest that reads brings torch in (a typo in the file is reported at once)
        from ddm_models.model_sizes import format_model_sizes, manifest_model_sizes
        from node.checkpoints.specs import check_model_specs

        check_model_specs(manifest)
        sizes = format_model_sizes(manifest_model_sizes(manifest))
    except Exception as error:
        fail(error)
    print(f"# swarm id: {manifest.swarm_id}")
    print("# " + sizes.replace("\n", "\n# "))
    print(yaml.safe_dump(manifest.to_file_dict(), sort_keys=False, allow_unicode=True), end="")
