"""How closely two honest auditors agree when their torch thread counts differ.

    python benchmarks/audit_agreement.py [--experts 8] [--threads 1 2]

Each thread count runs in its own process (its own MiniLM caption states too, as a real auditor's
would be), audits the same experts on the same held-out digits with `audit_loss` (float64) and
`expert_loss` (float32, for comparison), and computes `sample_fingerprint`. Prints one JSON line:
the largest relative loss difference of each, and how many fingerprints agree bit for bit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(threads: int, experts: int) -> list:
    import torch

    torch.set_num_threads(threads)
    from ddm_models.captions import all_captions
    from ddm_models.configs import expert_config
    from ddm_models.data import load_small_digits, subset
    from ddm_models.evaluation import audit_loss, audit_seed, expert_loss
    from ddm_models.experts import build_expert
    from ddm_models.fingerprints import sample_fingerprint
    from ddm_models.objectives import objective_for
    from ddm_models.sampling import LoadedExpert
    from ddm_models.text import CachedTextEncoder, MiniLMEncoder

    encoder = CachedTextEncoder(MiniLMEncoder())
    encoder.precompute(all_captions())
    data = subset(load_small_digits(), range(0, 1797, 7))
    rows = []
    for index in range(experts):
        objective = "fm" if index % 2 == 0 else "ddpm"
        torch.manual_seed(index)
        config = expert_config("digits-8x8", objective=objective, width=32, depth=2, heads=2)
        model = build_expert(config)
        for parameter in model.parameters():  # an untrained expert whose output depends on its input
            torch.nn.init.normal_(parameter, std=0.05 if parameter.dim() > 1 else 0.01)
        expert = LoadedExpert(0, config, objective_for(config), model.eval())
        seed = audit_seed(f"{index:064x}")
        rows.append({"audit": audit_loss(expert, data, encoder, seed=seed),
                     "float32": expert_loss(expert, data, encoder, seed=seed, max_images=128, batch_size=32),
                     "fingerprint": sample_fingerprint(expert, encoder, seed=seed)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs=2, default=[1, 2])
    parser.add_argument("--child", type=int, default=None)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.experts)))
        return
    runs = [json.loads(subprocess.run([sys.executable, __file__, "--child", str(t), "--experts", str(args.experts)],
                                      capture_output=True, text=True, check=True, cwd=ROOT).stdout.splitlines()[-1])
            for t in args.threads]
    a, b = runs

    def worst(field: str) -> float:
        return max(abs(x[field] - y[field]) / max(abs(x[field]), 1e-30) for x, y in zip(a, b))

    same = sum(x["fingerprint"] == y["fingerprint"] for x, y in zip(a, b))
    print(json.dumps({"threads": args.threads, "experts": args.experts, "audit_loss_max_rel_diff": worst("audit"),
                      "float32_loss_max_rel_diff": worst("float32"), "fingerprints_identical": same,
                      "fingerprints": len(a)}))


if __name__ == "__main__":
    main()
