"""An ensemble saved for offline use by `ddm-swarm fetch`, in a layout a diffusers user recognises:

    out/model_index.json                          which component lives in which folder
    out/expert_{k}/config.json                    the expert's architecture and where it came from
    out/expert_{k}/diffusion_pytorch_model.safetensors   its inference export, byte for byte as fetched
    out/router/config.json, out/router/diffusion_pytorch_model.safetensors
    out/ensemble.json                             the signed records, one per component folder
    out/manifest.yaml                             the swarm's manifest

The weights files are the very inference blobs the records sign, so `load_ensemble` checks again
what the generator checked when it fetched them: each record's signature and the swarm's record
policy but for expiry (`RecordPolicy.check_saved`: this swarm, a trusted signer, an allowed model),
that its file hashes to the record's inference sha256, and header, architecture, step and finite
weights (`check_expert`). The configs and model_index.json are for people and tools; nothing is
trusted from them. The folder may come from anyone: only regular files at the layout's own paths are
opened (a symlink, FIFO or device is refused before it is read).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from ddm_models.configs import canonical_json
from node.checkpoints.acceptance import check_expert, check_router
from node.errors import NodeError
from node.files import atomic_write_bytes
from node.swarm.manifest_files import read_manifest_file, write_manifest_file
from protocol.errors import HashMismatch, ProtocolError
from protocol.hashing import BlobHasher
from protocol.policy import RecordPolicy
from protocol.records import RouterRecord, decode_record

if TYPE_CHECKING:
    from node.generator.assembly import Ensemble

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "DdmSwarmEnsemble"


class NotASavedEnsemble(NodeError):
    """A folder given to `generate --from` is not (or no longer) what `ddm-swarm fetch` wrote."""


def folder_of(record) -> str:
    """'expert_3' or 'router': the component's folder (diffusers names components with underscores)."""
    return "router" if isinstance(record, RouterRecord) else f"expert_{record.cluster}"


def save_ensemble(ensemble: "Ensemble", out: Path) -> Path:
    """Write `ensemble` to `out` (see the module docstring); files are copied atomically, one by one."""
    out.mkdir(parents=True, exist_ok=True)
    configs = {expert.cluster: expert.config for expert in ensemble.experts}
    entries, components = [], {}
    for record in ensemble.records:
        folder = folder_of(record)
        (out / folder).mkdir(exist_ok=True)
        target = out / folder / WEIGHTS_FILE
        tmp = target.with_name(f".{WEIGHTS_FILE}.tmp")
        shutil.copyfile(ensemble.files[record.inference.sha256], tmp)
        tmp.replace(target)
        is_router = isinstance(record, RouterRecord)
        config = ensemble.router.config if is_router else configs[record.cluster]
        described = {"_class_name": "Router" if is_router else "Expert", "_ddm_swarm_job": str(record.job),
                     "model": record.model, "step": record.step, "samples_seen": record.samples_seen,
                     "sha256": record.inference.sha256, **json.loads(canonical_json(config))}
        atomic_write_bytes(out / folder / "config.json", json.dumps(described, indent=2, sort_keys=True).encode())
        components[folder] = ["ddm_swarm", described["_class_name"]]
        entries.append({"folder": folder, "file": f"{folder}/{WEIGHTS_FILE}", "record": record.encode().hex()})
    index = {"_class_name": CLASS_NAME, "swarm": ensemble.manifest.name, "swarm_id": ensemble.manifest.swarm_id,
             **dict(sorted(components.items()))}
    write_manifest_file(ensemble.manifest, out / "manifest.yaml")
    atomic_write_bytes(out / "model_index.json", json.dumps(index, indent=2).encode())
    atomic_write_bytes(out / "ensemble.json", json.dumps({"swarm_id": ensemble.manifest.swarm_id,
                                                          "checkpoints": entries}, indent=2).encode())
    return out


def load_ensemble(folder: Path) -> "Ensemble":
    """The ensemble saved in `folder`, every component checked again (see the module docstring)."""
    from node.generator.assembly import Ensemble

    try:
        index = json.loads(_read_regular(folder, "ensemble.json"))
        manifest = read_manifest_file(_regular_file(folder, "manifest.yaml"))
        json.loads(_read_regular(folder, "model_index.json"))
        entries = [(entry["folder"], decode_record(bytes.fromhex(entry["record"]))) for entry in index["checkpoints"]]
    except (OSError, ValueError, KeyError, TypeError, ProtocolError) as error:
        raise NotASavedEnsemble(f"{folder} is not an ensemble saved by `ddm-swarm fetch`: "
                                f"{type(error).__name__}: {str(error)[:200]}") from None
    if index.get("swarm_id") != manifest.swarm_id:
        raise NotASavedEnsemble(f"{folder}/ensemble.json belongs to another swarm than its manifest.yaml")
    policy = RecordPolicy(manifest)
    experts, router, records, files = [], None, [], {}
    for name, record in entries:
        policy.check_saved(record)
        if name != folder_of(record):  # the folder is chosen from the signed record, never from the index
            raise NotASavedEnsemble(f"{folder}/ensemble.json puts the record of {record.job} in folder {name!r:.80}")
        path = _regular_file(folder, folder_of(record), WEIGHTS_FILE)
        _check_file_hash(path, record.inference.sha256)
        if isinstance(record, RouterRecord):
            router = check_router(path, record, manifest, blob="inference")
        else:
            experts.append(check_expert(path, record, manifest, blob="inference"))
        records.append(record)
        files[record.inference.sha256] = path
    return Ensemble(manifest, experts, router, records, files)


def _regular_file(folder: Path, *parts: str) -> Path:
    """folder/parts...: every folder on the way a real folder and the last a regular file (lstat, so a
    link is never followed); `NotASavedEnsemble` otherwise."""
    path = folder
    for position, part in enumerate(parts):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError as error:
            raise NotASavedEnsemble(f"cannot read {path}: {error.strerror}; re-fetch the ensemble") from None
        last = position == len(parts) - 1
        if not (stat.S_ISREG(mode) if last else stat.S_ISDIR(mode)):
            raise NotASavedEnsemble(f"{path} is not a regular {'file' if last else 'folder'} (a symlink, FIFO or "
                                    "device is never read from a saved ensemble)")
    return path


def _open_regular(path: Path) -> int:
    # O_NOFOLLOW and O_NONBLOCK: a file swapped for a link or a FIFO after the lstat is neither
    # followed nor waited on; fstat then checks what was opened
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise NotASavedEnsemble(f"cannot read {path}: {error.strerror}; re-fetch the ensemble") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise NotASavedEnsemble(f"{path} is not a regular file")
    return descriptor


def _read_regular(folder: Path, name: str) -> str:
    with os.fdopen(_open_regular(_regular_file(folder, name)), "rb") as handle:
        return handle.read(16 * 1024 * 1024).decode()


def _check_file_hash(path: Path, sha256: str) -> None:
    hasher = BlobHasher()
    with os.fdopen(_open_regular(path), "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(piece)
    if hasher.finish().sha256 != sha256:
        raise HashMismatch(f"{path} does not hash to the sha256 its signed record names; re-fetch the ensemble")
