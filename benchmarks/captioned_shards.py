"""Reading a cluster's WebDataset shards: the first read (hash, decode, resize, cache) against a
restart's read from the cache.

    python benchmarks/captioned_shards.py [--images 4000] [--per-shard 500] [--source-side 64] [--size 32]

Writes --images captioned coloured shapes (PNG, --source-side pixels square) into shards of
--per-shard samples in a temporary folder, then loads them all with `load_captioned_shards` twice
into one cache dir: cold (every shard decoded and cached) and warm (cache only). Prints images/s
of each, the cache's bytes per image, and the process's peak RSS; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ddm_models.captioned_data import ShardFile, file_blob_id, load_captioned_shards  # noqa: E402
from tests.captioned_fixtures import COLOURS, SHAPES, write_shape_shard  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--source-side", type=int, default=64, help="side of the PNGs in the shards")
    parser.add_argument("--size", type=int, default=32, help="side the reader resizes to")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        shards = []
        for start in range(0, args.images, args.per_shard):
            samples = [rng.choice(kinds) for _ in range(min(args.per_shard, args.images - start))]
            path = write_shape_shard(root / f"shard-{start // args.per_shard:05d}.tar", samples, seed=start,
                                     side=args.source_side)
            shards.append(ShardFile(path, sha256=file_blob_id(path)))
        shard_bytes = sum(s.path.stat().st_size for s in shards)
        timings = {}
        for phase in ("cold", "warm"):
            start = time.perf_counter()
            data = load_captioned_shards(shards, args.size, 3, root / "cache")
            timings[phase] = time.perf_counter() - start
        cache_bytes = sum(p.stat().st_size for p in (root / "cache").iterdir())
    summary = {"images": len(data), "shards": len(shards), "source_side": args.source_side, "size": args.size,
               "shard_bytes": shard_bytes, "cold_images_per_s": len(data) / timings["cold"],
               "warm_images_per_s": len(data) / timings["warm"], "cache_bytes_per_image": cache_bytes / len(data),
               "dataset_bytes": data.pixels.numel(),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(f"{len(data)} images in {len(shards)} shards: cold read {summary['cold_images_per_s']:.0f} images/s, "
          f"warm (cache) {summary['warm_images_per_s']:.0f} images/s; peak RSS {summary['peak_rss_mib']:.0f} MiB")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
