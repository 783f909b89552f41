"""Router accuracy by noise level, with and without the pooled text embedding.

    python benchmarks/router.py [--steps 600] [--bins 10] [--threads 1]

In one run, on the embedded digits (K = 4 clusters of the 4,500 training images, 500 held out):
two routers with identical seeds, batches and noise train for --steps steps on the sampler's FM
path, one seeing (x_t, t) only (Paris), one also seeing the pooled MiniLM embedding of the caption
(DDM's router may see the condition). Their held-out accuracy is measured in --bins equal bins of
FM time t (each held-out image at several stratified t). Near t = 1 an image-only router can do no
better than the largest cluster; a text router can do no better than `text_bound`, the accuracy of
predicting each digit's most common cluster. Prints the table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ddm_models.captions import all_captions  # noqa: E402
from ddm_models.clustering import cluster_images  # noqa: E402
from ddm_models.configs import router_config  # noqa: E402
from ddm_models.data import heldout_split, load_embedded_digits, subset  # noqa: E402
from ddm_models.text import build_text_encoder  # noqa: E402
from ddm_models.router_training import RouterTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=4, help="noise draws per held-out image")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_embedded_digits()
    split = cluster_images(data.images, 4, seed=0)
    clusters = torch.from_numpy(split.assignments.copy())
    train_idx, heldout_idx = heldout_split(len(data), 0.1, 0)
    train, heldout = subset(data, train_idx), subset(data, heldout_idx)
    text = build_text_encoder("minilm")
    text.precompute(all_captions())

    labels, assignments = data.labels.numpy(), split.assignments
    table = np.zeros((4, 10), dtype=np.int64)  # held-out cluster x digit counts
    np.add.at(table, (assignments[heldout_idx], labels[heldout_idx]), 1)
    best_for_digit = split.label_table(labels, 10).argmax(axis=0)  # each digit's most common cluster
    heldout_clusters = assignments[heldout_idx]
    text_bound = float(np.mean(best_for_digit[labels[heldout_idx]] == heldout_clusters))
    prior_bound = float(np.bincount(heldout_clusters, minlength=4).max() / len(heldout_clusters))

    results = {}
    for use_text in (False, True):
        config = router_config("small", use_text=use_text)
        trainer = RouterTrainer(config, train, clusters[train_idx], text, seed=0, batch_size=args.batch_size,
                                lr=args.lr, warmup_steps=50, heldout=(heldout, clusters[heldout_idx]))
        stats = trainer.train_steps(args.steps)
        evaluation = trainer.evaluate(num_bins=args.bins, repeats=args.repeats)
        name = "with_text" if use_text else "image_only"
        results[name] = {"accuracy": evaluation.accuracy, "by_t": [[lo, hi, acc] for lo, hi, acc in evaluation.bins],
                         "images_per_s": stats.images_per_s, "train_s": stats.seconds,
                         "final_train_loss": float(np.mean(stats.losses[-50:]))}
        print(f"{name}: {args.steps} steps in {stats.seconds:.0f} s ({stats.images_per_s:.0f} img/s), "
              f"held-out accuracy {evaluation.accuracy:.3f}", flush=True)

    print(f"cluster x digit counts (held out):\n{table}")
    print(f"{'t bin':>12} {'image only':>11} {'with text':>10}")
    for (lo, hi, a), (_, _, b) in zip(results["image_only"]["by_t"], results["with_text"]["by_t"]):
        print(f"{lo:5.2f}-{hi:4.2f}   {a:>11.3f} {b:>10.3f}")
    print(f"bounds at t = 1: largest cluster {prior_bound:.3f}, most common cluster of the digit {text_bound:.3f}")
    print(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
                      "bounds_at_pure_noise": {"image_only": prior_bound, "with_text": text_bound},
                      "load_average": list(__import__("os").getloadavg()), "finished": time.time(), **results}))


if __name__ == "__main__":
    main()
