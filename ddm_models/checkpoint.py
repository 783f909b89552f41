"""The publishable checkpoint: safetensors files, self-describing, checked before use.

A checkpoint comes in two contents (the header's `contents`):
- "training" (the state): `ema/<param>` (the weights for generation), optionally `train/<param>`
  (the raw training weights) and `optim/<param>/exp_avg|exp_avg_sq` (AdamW moments), in float32, so
  another node can continue training from it;
- "inference" (the export): the EMA weights alone under their plain parameter names, in bfloat16 or
  float16 (`INFERENCE_DTYPES`), about 1/8 of the state: what a generator downloads. It is derived
  from a state file by `write_inference_export`, so both hold the same EMA weights
  (`check_same_weights`).
Metadata (safetensors' str -> str header): format, kind (expert | router),
objective, config (canonical JSON), config_hash, cluster, step, samples_seen, held-out metric and
its name, optimizer step, and a free JSON `extra`.

Everything read from a file is validated: a checkpoint with bad metadata, a config that does not
hash to its recorded hash, missing or unexpected tensors, wrong shapes or non-finite weights raises
`InvalidCheckpoint` and is never loaded. The header's `checksum` (sha256 of the other metadata and
every tensor) catches bytes that rotted on disk, which would otherwise load as slightly wrong weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ddm_models.configs import ExpertConfig, InvalidConfig, RouterConfig, canonical_json, config_hash
from ddm_models.errors import ModelError

FORMAT = "ddm-swarm/checkpoint/1"
KINDS = ("expert", "router")
CONTENTS = ("training", "inference")
INFERENCE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class InvalidCheckpoint(ModelError, ValueError):
    """A checkpoint file is malformed or unsafe to load; the message says what is wrong with it."""


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    """What a checkpoint says about itself. `cluster` is -1 for a router; `heldout_metric` is the
    held-out loss of an expert or the held-out accuracy of a router (`heldout_metric_name`)."""

    kind: str
    config: ExpertConfig | RouterConfig
    cluster: int
    step: int
    samples_seen: int
    heldout_metric: float | None = None
    heldout_metric_name: str = "loss"
    optimizer_step: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    contents: str = "training"  # or "inference": EMA weights only, 16-bit

    @property
    def objective(self) -> str:
        return self.config.objective if isinstance(self.config, ExpertConfig) else "router"

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    def to_header(self) -> dict[str, str]:
        return {
            "format": FORMAT, "kind": self.kind, "objective": self.objective,
            "config": canonical_json(self.config), "config_hash": self.config_hash,
            "cluster": str(self.cluster), "step": str(self.step), "samples_seen": str(self.samples_seen),
            "heldout_metric": "" if self.heldout_metric is None else repr(float(self.heldout_metric)),
            "heldout_metric_name": self.heldout_metric_name,
            "optimizer_step": "" if self.optimizer_step is None else str(self.optimizer_step),
            "extra": json.dumps(self.extra, sort_keys=True), "contents": self.contents,
        }

    @classmethod
    def from_header(cls, header: Any, where: str = "checkpoint") -> CheckpointMetadata:
        """Parse and validate a safetensors header; raises `InvalidCheckpoint` and nothing else, whatever
        the header holds (it comes from a stranger's file): a str -> str map within `MAX_HEADER_CHARS`,
        JSON nested at most `MAX_JSON_DEPTH` deep, integers in [0, MAX_STEP]."""
        if not header:
            raise InvalidCheckpoint(f"{where} has no metadata; it was not written by ddm-swarm")
        try:
            return cls._parse_header(_string_map(header, where), where)
        except InvalidCheckpoint:
            raise
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError, RecursionError,
                InvalidConfig) as error:  # a config value of a type its dataclass does not expect, and the like
            raise InvalidCheckpoint(f"{where} has bad metadata: {type(error).__name__}: {str(error)[:200]}") from None

    @classmethod
    def _parse_header(cls, header: dict[str, str], where: str) -> CheckpointMetadata:
        if header.get("format") != FORMAT:
            raise InvalidCheckpoint(f"{where} has format {header.get('format')!r:.80}, expected {FORMAT!r}")
        kind = header["kind"]
        if kind not in KINDS:
            raise InvalidCheckpoint(f"{where} has kind {kind!r:.80}, expected one of {KINDS}")
        config_data = _json_object(header["config"], f"{where}: config")
        config_type = config_data.pop("type", None)
        expected_type = "ExpertConfig" if kind == "expert" else "RouterConfig"
        if config_type != expected_type:
            raise InvalidCheckpoint(f"{where} is a {kind} but its config is a {config_type!r:.80}")
        config = (ExpertConfig if kind == "expert" else RouterConfig).from_dict(config_data)
        metadata = cls(kind=kind, config=config, cluster=_count(header["cluster"], where, low=-1),
                       step=_count(header["step"], where), samples_seen=_count(header["samples_seen"], where, high=MAX_STEP << 20),
                       heldout_metric=float(header["heldout_metric"]) if header["heldout_metric"] else None,
                       heldout_metric_name=header["heldout_metric_name"],
                       optimizer_step=_count(header["optimizer_step"], where) if header["optimizer_step"] else None,
                       extra=_json_object(header["extra"], f"{where}: 'extra'"),
                       contents=header.get("contents", "training"))  # files before exports have none
        if header["config_hash"] != metadata.config_hash:
            raise InvalidCheckpoint(f"{where}: its config hashes to {metadata.config_hash}, not to the recorded "
                                    f"{header['config_hash']:.80}")
        if header["objective"] != metadata.objective:
            raise InvalidCheckpoint(f"{where}: objective {header['objective']!r:.80} contradicts its config")
        if len(metadata.heldout_metric_name) > MAX_HEADER_KEY_CHARS:
            raise InvalidCheckpoint(f"{where}: the held-out metric's name is longer than {MAX_HEADER_KEY_CHARS}")
        if kind == "expert" and metadata.cluster < 0:
            raise InvalidCheckpoint(f"{where}: negative cluster")
        if metadata.heldout_metric is not None and not math.isfinite(metadata.heldout_metric):
            raise InvalidCheckpoint(f"{where}: held-out metric is {metadata.heldout_metric}")
        if metadata.contents not in CONTENTS:
            raise InvalidCheckpoint(f"{where} has contents {metadata.contents!r:.80}, expected one of {CONTENTS}")
        return metadata


# What a header may hold. A real one is a few KiB; steps stay far below int64 so that a step read
# from a stranger's file can be counted on (step + 1) by any consumer without overflowing a tensor or
# a record field. samples_seen shares the bound times a batch of up to 2^20 images.
MAX_HEADER_CHARS = 1 << 20
MAX_HEADER_VALUE_CHARS = 256 * 1024
MAX_HEADER_KEY_CHARS = 64
MAX_JSON_DEPTH = 16
MAX_STEP = 2**40  # protocol.limits.MAX_STEP: the same bound for records and files


def _string_map(header: Any, where: str) -> dict[str, str]:
    if not isinstance(header, dict):
        raise InvalidCheckpoint(f"{where}: its metadata is a {type(header).__name__}, not a string map")
    total = 0
    for key, value in header.items():
        if not isinstance(key, str) or not isinstance(value, str) or len(key) > MAX_HEADER_KEY_CHARS:
            raise InvalidCheckpoint(f"{where}: its metadata must map short strings to strings")
        if len(value) > MAX_HEADER_VALUE_CHARS:
            raise InvalidCheckpoint(f"{where}: metadata entry {key!r} has {len(value)} characters, more than "
                                    f"{MAX_HEADER_VALUE_CHARS}")
        total += len(key) + len(value)
    if total > MAX_HEADER_CHARS:
        raise InvalidCheckpoint(f"{where}: its metadata has {total} characters, more than {MAX_HEADER_CHARS}")
    return header


def _json_object(text: str, where: str) -> dict[str, Any]:
    """A JSON object nested at most MAX_JSON_DEPTH deep. The depth is counted before parsing: the json
    module recurses once per level and a deep enough document exhausts the interpreter's stack."""
    depth, deepest, in_string, escaped = 0, 0, False, False
    for char in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                raise InvalidCheckpoint(f"{where} is nested deeper than {MAX_JSON_DEPTH} levels")
        elif char in "]}":
            depth -= 1
    value = json.loads(text)
    if not isinstance(value, dict):
        raise InvalidCheckpoint(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _count(text: str, where: str, low: int = 0, high: int = MAX_STEP) -> int:
    # digits only: int() also takes "1_000", " 7" and 4,300-digit numbers
    body = text[1:] if text.startswith("-") else text
    if not body.isascii() or not body.isdigit() or len(body) > 20:
        raise InvalidCheckpoint(f"{where}: {text[:40]!r} is not a whole number")
    value = int(text)
    if not low <= value <= high:
        raise InvalidCheckpoint(f"{where}: {value} is outside [{low}, {high}] (a negative step, samples_seen or "
                                "cluster, or a count no training reaches)")
    return value


def checkpoint_tensors(ema: dict[str, torch.Tensor], train: dict[str, torch.Tensor] | None = None,
                       optimizer_moments: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Flatten state dicts into the file's tensor names (CPU, contiguous copies)."""
    tensors = {f"ema/{name}": value for name, value in ema.items()}
    tensors.update({f"train/{name}": value for name, value in (train or {}).items()})
    for name, moments in (optimizer_moments or {}).items():
        tensors.update({f"optim/{name}/{moment}": value for moment, value in moments.items()})
    return {name: value.detach().to("cpu").contiguous().clone() for name, value in tensors.items()}


def content_checksum(header: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata (but its own `checksum` entry) and every tensor's name, dtype, shape
    and bytes, in name order."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def write_checkpoint(path: str | Path, metadata: CheckpointMetadata, tensors: dict[str, torch.Tensor]) -> Path:
    """Write atomically: a temporary file in the same folder, fsync, rename over `path`, fsync the
    folder. A crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = metadata.to_header()
    header["checksum"] = content_checksum(header, tensors)
    data = save_safetensors(tensors, metadata=header)
    descriptor, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def read_checkpoint(path: str | Path | bytes) -> tuple[CheckpointMetadata, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a checkpoint file (or its bytes), validated: metadata, config hash,
    tensor name prefixes, and that every floating tensor is finite. A file is read tensor by tensor
    through a memory map, so a multi-GB checkpoint is not held twice in memory."""
    where = "checkpoint bytes" if isinstance(path, bytes) else str(path)
    try:
        if isinstance(path, bytes):
            tensors, header = load_safetensors(path), _header_of(path)
        else:
            with safe_open(path, framework="pt") as file:
                header = file.metadata()
                tensors = {name: file.get_tensor(name) for name in file.keys()}
    except OSError as error:
        raise InvalidCheckpoint(f"cannot read {where}: {error}") from error
    except (SafetensorError, ValueError, json.JSONDecodeError) as error:
        raise InvalidCheckpoint(f"{where} is not a valid safetensors file: {error}") from error
    if header and "checksum" in header and header["checksum"] != content_checksum(header, tensors):
        raise InvalidCheckpoint(f"{where} is corrupt: its contents do not match the checksum written with them")
    metadata = CheckpointMetadata.from_header(header, where)
    inference = metadata.contents == "inference"
    for name, tensor in tensors.items():
        if ("/" in name) if inference else not name.startswith(("ema/", "train/", "optim/")):
            raise InvalidCheckpoint(f"{where} has an unexpected tensor {name!r} for {metadata.contents} contents")
        if inference and tensor.dtype not in INFERENCE_DTYPES.values():
            raise InvalidCheckpoint(f"{where}: inference tensor {name!r} is {tensor.dtype}, expected one of "
                                    f"{sorted(INFERENCE_DTYPES)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidCheckpoint(f"{where}: tensor {name!r} has NaN or infinite values")
    return metadata, tensors


def _header_of(data: bytes) -> dict[str, str] | None:
    """The `__metadata__` of a safetensors buffer (8-byte little-endian header length, JSON header)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]).get("__metadata__")


def write_inference_export(state: str | Path, path: str | Path, dtype: str = "bfloat16") -> Path:
    """Write the inference export of the checkpoint file `state` to `path` (atomically): its EMA
    weights cast to `dtype` ("bfloat16" or "float16"), its metadata with contents "inference"."""
    if dtype not in INFERENCE_DTYPES:
        raise InvalidCheckpoint(f"inference exports are {sorted(INFERENCE_DTYPES)}, not {dtype!r}")
    metadata, tensors = read_checkpoint(state)
    if metadata.contents != "training":
        raise InvalidCheckpoint(f"{state} is already an inference export")
    weights = {name: value.to(INFERENCE_DTYPES[dtype]) if value.is_floating_point() else value
               for name, value in state_dict_part(tensors, "ema").items()}
    export = dataclasses.replace(metadata, contents="inference", optimizer_step=None)
    return write_checkpoint(path, export, weights)


def check_same_weights(state: str | Path, inference: str | Path) -> None:
    """Raise `InvalidCheckpoint` unless the inference export `inference` is exactly the EMA weights
    of the state file `state` (cast to the export's dtype) with the same metadata: what a peer holding
    both blobs of one record checks, since a generator sees only the export."""
    state_metadata, state_tensors = read_checkpoint(state)
    export_metadata, export_tensors = read_checkpoint(inference)
    if (state_metadata.contents, export_metadata.contents) != ("training", "inference"):
        raise InvalidCheckpoint(f"{state} and {inference} are not a state file and its inference export")
    expected_metadata = dataclasses.replace(state_metadata, contents="inference", optimizer_step=None)
    if export_metadata != expected_metadata:
        raise InvalidCheckpoint(f"{inference}: its metadata differs from the state file's")
    ema = state_dict_part(state_tensors, "ema")
    if set(ema) != set(export_tensors):
        raise InvalidCheckpoint(f"{inference} holds other tensors than the state file's EMA weights")
    for name, value in ema.items():
        exported = export_tensors[name]
        if exported.shape != value.shape or not torch.equal(exported, value.to(exported.dtype)):
            raise InvalidCheckpoint(f"{inference}: {name} is not the state file's EMA weight")


def state_dict_part(tensors: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """The tensors under `part/` ("ema" or "train") with the prefix removed."""
    prefix = f"{part}/"
    return {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}


def optimizer_moments(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{param name: {"exp_avg": ..., "exp_avg_sq": ...}} from a checkpoint's `optim/` tensors."""
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            param, _, moment = name[len("optim/"):].rpartition("/")
            moments.setdefault(param, {})[moment] = value
    return moments


def check_state_matches(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise `InvalidCheckpoint` unless `state` has exactly the model's tensor names, shapes and dtypes."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InvalidCheckpoint(f"{where} does not fit its config's architecture: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
    for name, value in state.items():
        if value.shape != expected[name].shape or value.dtype != expected[name].dtype:
            raise InvalidCheckpoint(f"{where}: {name} is {value.dtype} {tuple(value.shape)}, the architecture "
                                    f"needs {expected[name].dtype} {tuple(expected[name].shape)}")


def check_training_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Validate the optional `train/` and `optim/` parts against the model."""
    train = state_dict_part(tensors, "train")
    if train:
        check_state_matches(model, train, f"{where} (training weights)")
    parameters = dict(model.named_parameters())
    for name, moments in optimizer_moments(tensors).items():
        if name not in parameters or set(moments) != {"exp_avg", "exp_avg_sq"}:
            raise InvalidCheckpoint(f"{where}: optimizer state for unknown parameter {name!r} or moments {sorted(moments)}")
        if any(m.shape != parameters[name].shape for m in moments.values()):
            raise InvalidCheckpoint(f"{where}: optimizer state of {name} has the wrong shape")


def _weights(model: torch.nn.Module, metadata: CheckpointMetadata, tensors: dict[str, torch.Tensor],
             weights: str, where: str) -> dict[str, torch.Tensor]:
    """The state dict to load into `model` (in the model's dtypes): `weights` ("ema" or "train") of
    a training file, the 16-bit weights of an inference export (which has only the EMA)."""
    if metadata.contents == "training":
        state = state_dict_part(tensors, weights)
        check_state_matches(model, state, where)
        check_training_state(model, tensors, where)
        return state
    if weights != "ema":
        raise InvalidCheckpoint(f"{where} is an inference export: it holds the EMA weights only, not {weights!r}")
    expected = model.state_dict()
    state = {name: value.to(expected[name].dtype) if name in expected else value for name, value in tensors.items()}
    check_state_matches(model, state, where)
    return state


def load_expert(path: str | Path | bytes, *, device: torch.device | str = "cpu", weights: str = "ema",
                dtype: torch.dtype | None = torch.float32):
    """A `LoadedExpert` (eval mode, parameters in `dtype`) from a validated expert checkpoint, a
    training file or an inference export; `weights` "ema" (for generation) or "train"."""
    from ddm_models.experts import build_expert
    from ddm_models.objectives import objective_for
    from ddm_models.sampling import LoadedExpert

    where = "checkpoint bytes" if isinstance(path, bytes) else str(path)
    metadata, tensors = read_checkpoint(path)
    if metadata.kind != "expert":
        raise InvalidCheckpoint(f"{where} holds a {metadata.kind}, not an expert")
    model = build_expert(metadata.config)
    model.load_state_dict(_weights(model, metadata, tensors, weights, where))
    return LoadedExpert(cluster=metadata.cluster, config=metadata.config,
                        objective=objective_for(metadata.config),
                        model=model.to(device=device, dtype=dtype).eval().requires_grad_(False), metadata=metadata)


def load_router(path: str | Path | bytes, *, device: torch.device | str = "cpu", weights: str = "ema",
                dtype: torch.dtype | None = torch.float32):
    """A `Router` (eval mode, parameters in `dtype`) from a validated router checkpoint (either contents)."""
    from ddm_models.router import build_router

    where = "checkpoint bytes" if isinstance(path, bytes) else str(path)
    metadata, tensors = read_checkpoint(path)
    if metadata.kind != "router":
        raise InvalidCheckpoint(f"{where} holds a {metadata.kind}, not a router")
    router = build_router(metadata.config)
    router.load_state_dict(_weights(router, metadata, tensors, weights, where))
    return router.to(device=device, dtype=dtype).eval().requires_grad_(False)
