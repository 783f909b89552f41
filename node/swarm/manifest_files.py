"""Find and read swarm manifests: a bundled swarm by name (configs/<name>.yaml) or a YAML file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import List

import yaml

from node.errors import UnknownSwarm
from protocol.errors import InvalidManifest
from protocol.manifest import SwarmManifest


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error, not a silent overwrite."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys get PyYAML's own error below
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def bundled_swarms() -> List[str]:
    return sorted(p.name[:-5] for p in resources.files("configs").iterdir() if p.name.endswith(".yaml")
                  and not p.name.startswith("model-"))


def read_manifest_file(path: Path) -> SwarmManifest:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidManifest(f"cannot read manifest {path}: {error}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise InvalidManifest(f"manifest {path} is not valid YAML: {_yaml_problem(error)}") from None
    try:
        return SwarmManifest.from_dict(data)
    except InvalidManifest as error:
        raise InvalidManifest(f"{path}: {error}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: where, and what it expected."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = " ".join(str(getattr(error, "problem", None) or error).split())
    context = getattr(error, "context", None)
    return where + problem + (f" ({' '.join(str(context).split())})" if context else "")


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
