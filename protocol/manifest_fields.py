"""Reading one mapping of a manifest: typed field access that names the offending field.

Shared by `protocol.manifest` and `protocol.manifest_data`; every refusal is `InvalidManifest`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from protocol.errors import InvalidManifest

_SCALARS = (str, int, float, bool)
_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
               Mapping: "a mapping"}


class ManifestFields:
    """Reads one mapping of a manifest, tracking the field path for error messages."""

    def __init__(self, data: Any, path: str):
        if not isinstance(data, Mapping):
            raise InvalidManifest(f"manifest field '{path}' must be a mapping, got {type(data).__name__}")
        self.data, self.path, self.used = data, path, set()

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type | tuple, default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise InvalidManifest(f"manifest field '{self._name(key)}' is missing")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind in (int, float):
            raise InvalidManifest(f"manifest field '{self._name(key)}' must be a number, got a boolean")
        if not isinstance(value, kind):
            wanted = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise InvalidManifest(f"manifest field '{self._name(key)}' must be {wanted}, got {value!r:.60}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidManifest(f"manifest field '{self._name(key)}' must be finite")
        return value

    def sub(self, key: str, default: Any = ...) -> "ManifestFields":
        return ManifestFields(self.get(key, Mapping, {} if default is ... else default), self._name(key))

    def done(self) -> None:
        unknown = sorted(str(k) for k in set(self.data) - self.used)
        if unknown:
            raise InvalidManifest(f"manifest has unknown field(s) {', '.join(self._name(k) for k in unknown)}")


def positive(value: float, name: str) -> None:
    if value <= 0:
        raise InvalidManifest(f"manifest field '{name}' must be positive, got {value}")
