"""Light downloads: bytes a generator fetches to assemble the ensemble, per byte of the bf16 weights.

    python benchmarks/light_downloads.py [--manifest tests/manifests/tiny.yaml]

1. A `ddm-swarm bootstrap` process, and a publisher process (this script with `--publish`) that
   writes, for every job of the manifest, a checkpoint as a trainer publishes it (the state file:
   EMA, training weights and both AdamW moments in float32; and its inference export,
   `write_inference_export`, bfloat16), puts both in its blob store, serves them and announces the
   signed record and provider records.
2. This process then assembles the ensemble with `node.generator.client.assemble_ensemble` into a
   fresh cache, as `ddm-swarm generate` does; every byte the generator downloaded lands in that
   cache, so its size is the bytes fetched.
3. It reports `ratio` = bytes fetched / bf16 weight bytes of the experts and router (2 bytes per
   element of their state dicts; target <= 1.05), and `old_ratio`: what fetching the state blobs
   (one blob per record, as before the export existed) would have cost, from the records' state
   blob sizes.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(1)


def publish(manifest_path: Path, initial_peers: list, folder: Path) -> None:
    """The publisher: real checkpoint files for every job, served and announced until killed."""
    from hivemind.utils.timed_storage import get_dht_time

    from ddm_models.checkpoint import CheckpointMetadata, checkpoint_tensors, write_checkpoint, write_inference_export
    from ddm_models.experts import build_expert
    from ddm_models.router import build_router
    from node.blobs.service import BlobService
    from node.blobs.store import BlobStore
    from node.checkpoints.specs import expert_config, router_config
    from node.network import NetworkLoop
    from node.swarm.manifest_files import read_manifest_file
    from node.swarm.membership import SwarmMembership
    from protocol.identity import Identity
    from protocol.records import CheckpointRecord, ProviderRecord, RouterRecord

    manifest = read_manifest_file(manifest_path)
    membership = SwarmMembership(manifest, Identity.generate(), initial_peers=initial_peers)
    store = BlobStore(folder / "store")
    BlobService(membership, store, NetworkLoop(), serve=True)
    now, step, refs, records = get_dht_time(), 40, [], []
    for job in manifest.jobs:
        if job.is_router:
            config, cluster, model = router_config(manifest), -1, build_router(router_config(manifest))
        else:
            spec = manifest.expert_for_cluster(job.cluster)
            config, cluster = expert_config(spec, manifest), job.cluster
            model = build_expert(config)
        state = model.state_dict()
        moments = {name: {"exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
                   for name, p in model.named_parameters()}  # every parameter has both after one step
        metadata = CheckpointMetadata(kind="router" if job.is_router else "expert", config=config, cluster=cluster,
                                      step=step, samples_seen=32 * step, heldout_metric=0.5,
                                      heldout_metric_name="accuracy" if job.is_router else "loss", optimizer_step=step)
        state_path = write_checkpoint(folder / f"{job.slug}.safetensors", metadata,
                                      checkpoint_tensors(state, state, moments))
        blob = store.put_file(state_path)
        inference = store.put_file(write_inference_export(state_path, folder / f"{job.slug}-export.safetensors"))
        common = dict(swarm_id=membership.swarm_id, step=step, samples_seen=32 * step, blob=blob, inference=inference,
                      parent="", created_at=now, expires_at=now + 600)
        if job.is_router:
            record = RouterRecord(model=manifest.router.name, spec_hash=manifest.router.spec_hash,
                                  num_clusters=manifest.num_clusters, heldout_accuracy=0.5, **common)
        else:
            record = CheckpointRecord(cluster=job.cluster, model=spec.name, objective=spec.objective,
                                      spec_hash=spec.spec_hash, heldout_loss=0.5, **common)
        membership.publish(record.signed_by(membership.identity))
        refs += [blob, inference]
        records.append(record)

    def keep_providing() -> None:
        while True:
            expires = get_dht_time() + 3 * manifest.timing.lease_s
            for ref in refs:
                provider = ProviderRecord(membership.swarm_id, ref, membership.peer_id,
                                          tuple(membership.maddrs[:8]), expires)
                membership.publish(provider.signed_by(membership.identity), confirm=False)
            time.sleep(manifest.timing.lease_s)

    keep_providing_thread = threading.Thread(target=keep_providing, daemon=True)
    keep_providing_thread.start()
    time.sleep(2 * manifest.timing.lease_s)  # the provider records are out
    print(json.dumps({"published": len(records)}), flush=True)
    threading.Event().wait()


def bf16_bytes(manifest) -> dict:
    """2 bytes per element of each job's model state dict, by job (shapes only: no weights built)."""
    from ddm_models.experts import build_expert
    from ddm_models.router import build_router
    from node.checkpoints.specs import expert_config, router_config

    sizes = {}
    with torch.device("meta"):
        for job in manifest.jobs:
            model = (build_router(router_config(manifest)) if job.is_router else
                     build_expert(expert_config(manifest.expert_for_cluster(job.cluster), manifest)))
            sizes[str(job)] = 2 * sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=REPO / "tests" / "manifests" / "tiny.yaml")
    parser.add_argument("--publish", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--initial-peers", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish is not None:
        return publish(args.manifest, args.initial_peers, args.publish)

    from node.generator.client import assemble_ensemble
    from node.swarm.manifest_files import read_manifest_file
    from tests.swarm_harness import BootstrapProcess, LineProcess, child_env

    manifest = read_manifest_file(args.manifest)
    with tempfile.TemporaryDirectory(prefix="light-downloads-") as tmp:
        tmp = Path(tmp)
        boot = BootstrapProcess(args.manifest, tmp / "boot.key")
        publisher = None
        try:
            publisher = LineProcess([sys.executable, str(Path(__file__).resolve()), "--manifest", str(args.manifest),
                                     "--publish", str(tmp / "publisher"), "--initial-peers", *boot.maddrs],
                                    env=child_env())
            publisher.wait_for(lambda line: line.startswith('{"published"'), timeout=300)
            started = time.monotonic()
            ensemble = assemble_ensemble(manifest, initial_peers=boot.maddrs, cache_dir=tmp / "generator",
                                         require_all=True)
            seconds = time.monotonic() - started
            fetched = sum(path.stat().st_size for path in (tmp / "generator").rglob("*") if path.is_file()
                          and "blobs" in path.parts)
        finally:
            if publisher is not None:
                publisher.kill()
            boot.stop()
    weights = bf16_bytes(manifest)
    state_bytes = sum(record.blob.size for record in ensemble.records)
    export_bytes = sum(record.inference.size for record in ensemble.records)
    result = {"benchmark": "light_downloads", "manifest": str(args.manifest), "jobs": len(ensemble.records),
              "bf16_weight_bytes": sum(weights.values()), "fetched_bytes": fetched,
              "inference_blob_bytes": export_bytes, "state_blob_bytes": state_bytes,
              "ratio": round(fetched / sum(weights.values()), 4),
              "old_ratio": round(state_bytes / sum(weights.values()), 4), "target": 1.05,
              "assembly_s": round(seconds, 1), "load_avg": round(os.getloadavg()[0], 1)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
