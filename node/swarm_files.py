"""Find and read swarm manifests: a bundled swarm by name (configs/<name>.yaml) or a YAML file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import List

import yaml

from node.errors import UnknownSwarm
from protocol.errors import InvalidManifest
from protocol.manifest import SwarmManifest


def bundled_swarms() -> List[str]:
    return sorted(p.name[:-5] for p in resources.files("configs").iterdir() if p.name.endswith(".yaml")
                  and not p.name.startswith("model-"))


def read_manifest_file(path: Path) -> SwarmManifest:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidManifest(f"cannot read manifest {path}: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InvalidManifest(f"manifest {path} is not valid YAML: {error}") from None
    try:
        return SwarmManifest.from_dict(data)
    except InvalidManifest as error:
        raise InvalidManifest(f"{path}: {error}") from None


def load_manifest(swarm: str) -> SwarmManifest:
    """`swarm` is a path to a manifest file, or the name of a swarm bundled with ddm-swarm."""
    path = Path(swarm)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise UnknownSwarm(f"manifest file {path} does not exist")
        return read_manifest_file(path)
    bundled = resources.files("configs") / f"{swarm}.yaml"
    if not bundled.is_file():
        raise UnknownSwarm(f"unknown swarm {swarm!r}: not a manifest file, and the bundled swarms are "
                           f"{', '.join(bundled_swarms()) or 'none'}")
    with resources.as_file(bundled) as file:
        return read_manifest_file(file)


def write_manifest_file(manifest: SwarmManifest, path: Path) -> None:
    """Write a manifest as YAML atomically; reading it back gives the same swarm id."""
    from node.files import atomic_write_bytes

    text = yaml.safe_dump(manifest.to_file_dict(), sort_keys=False, allow_unicode=True)
    atomic_write_bytes(Path(path), text.encode("utf-8"))
    if read_manifest_file(Path(path)).swarm_id != manifest.swarm_id:
        raise InvalidManifest(f"manifest written to {path} does not read back to the same swarm id")
