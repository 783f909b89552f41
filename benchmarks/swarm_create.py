"""swarm create throughput and memory: images/s and peak RSS at 10k and 100k synthetic images.

For each size N, synthetic captioned images (coloured shapes, 48x48 PNGs) are first written as
webdataset shards of 10,000 samples (not timed); then a fresh child process runs
`create_swarm_from_data` over them (read, prepare to 32x32, embed, two-stage k-means, write
shards and the manifest) and reports its wall time and peak RSS (`ru_maxrss`). The child's RSS
right after its imports (torch, scikit-learn, Pillow) is the baseline, so "RSS above baseline" is
what creation itself costs. Memory is bounded if that figure stays flat as N grows (ratio 100k/10k near 1). The peak of
RssAnon is reported too: ru_maxrss also counts the pages of the memory-mapped embeddings, which
are file-backed (the kernel writes them out and drops them under pressure).

    python benchmarks/swarm_create.py --sizes 10000 100000 --clusters 8

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD_SAMPLES = 10_000


def write_source(folder: Path, count: int) -> None:
    import io
    import tarfile

    from ddm_models.sources.shapes import shape_sample

    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, count, SHARD_SAMPLES):
        with tarfile.open(folder / f"{start // SHARD_SAMPLES:06d}.tar", "w") as archive:
            for index in range(start, min(start + SHARD_SAMPLES, count)):
                png, caption = shape_sample(index)
                for name, data in ((f"{index:07d}.png", png), (f"{index:07d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))


class AnonymousMemory:
    """Samples RssAnon (/proc/self/status) every 0.1 s: memory the process itself holds, without
    the file-backed pages of memory maps, which ru_maxrss counts too but the kernel can drop."""

    def __init__(self) -> None:
        import threading

        self.peak_kib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kib


def child(source: str, out: str, clusters: int) -> None:
    """Run one creation and print its figures as JSON (in a fresh process: its own peak RSS)."""
    import torch

    torch.set_num_threads(1)
    import PIL.PngImagePlugin  # noqa: F401 - the libraries creation loads, so the baseline holds them
    import sklearn.cluster  # noqa: F401
    import sklearn.decomposition  # noqa: F401

    from bootstrap.create import create_swarm_from_data

    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    anonymous = AnonymousMemory()
    started = time.perf_counter()
    created = create_swarm_from_data(source, Path(out), clusters=clusters, image_size=32)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_anon_kib = anonymous.stop()
    shard_bytes = sum(s.blob.size for s in created.manifest.dataset.all_shards())
    print(json.dumps({"images": created.report.kept, "seconds": round(seconds, 2),
                      "images_per_s": round(created.report.kept / seconds, 1),
                      "peak_rss_mib": round(peak_kib / 1024, 1), "baseline_rss_mib": round(baseline_kib / 1024, 1),
                      "rss_above_baseline_mib": round((peak_kib - baseline_kib) / 1024, 1),
                      "peak_anon_rss_mib": round(peak_anon_kib / 1024, 1),
                      "shards": len(created.manifest.dataset.all_shards()), "shard_mib": round(shard_bytes / 2**20, 1),
                      "method": created.manifest.clustering.method, "swarm_id": created.manifest.swarm_id}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--work", type=Path, default=None, help="folder for the data (default: a temporary one)")
    parser.add_argument("--child", nargs=3, metavar=("SOURCE", "OUT", "CLUSTERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]))
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="swarm-create-bench-", dir=args.work) as work:
        for size in args.sizes:
            source = Path(work) / f"source-{size}"
            started = time.perf_counter()
            write_source(source, size)
            console.print(f"wrote {size} synthetic images in {time.perf_counter() - started:.0f} s")
            out = Path(work) / f"swarm-{size}.yaml"
            run = subprocess.run([sys.executable, __file__, "--child", str(source), str(out), str(args.clusters)],
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if run.returncode:
                console.print(run.stderr[-3000:])
                raise SystemExit(f"creation at {size} images failed")
            results[size] = json.loads(run.stdout.strip().splitlines()[-1])
            console.print(f"{size}: {results[size]}")
    table = Table("images", "images/s", "peak RSS MiB", "above baseline MiB", "peak anon RSS MiB", "shards",
                  "shard MiB")
    for size, r in results.items():
        table.add_row(str(size), str(r["images_per_s"]), str(r["peak_rss_mib"]), str(r["rss_above_baseline_mib"]),
                      str(r["peak_anon_rss_mib"]), str(r["shards"]), str(r["shard_mib"]))
    console.print(table)
    sizes = sorted(results)
    summary = {"benchmark": "swarm_create", "clusters": args.clusters,
               "results": {str(k): v for k, v in results.items()}}
    if len(sizes) > 1:
        small, large = results[sizes[0]], results[sizes[-1]]
        summary["peak_rss_ratio_largest_vs_smallest"] = round(large["peak_rss_mib"] / small["peak_rss_mib"], 3)
        summary["peak_anon_rss_ratio_largest_vs_smallest"] = round(
            large["peak_anon_rss_mib"] / small["peak_anon_rss_mib"], 3)
        summary["images_per_s_ratio_largest_vs_smallest"] = round(large["images_per_s"] / small["images_per_s"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
