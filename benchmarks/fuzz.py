"""Fuzz every decoder of protocol/ for minutes: the targets of tests/fuzz_targets.py, which CI runs
only a few hundred times each, run here in rounds until the time is spent.

    python benchmarks/fuzz.py [--minutes 5] [--target SUBSTRING] [--seed N]

Each round runs one target for up to `--round-examples` hypothesis examples with a fresh seed
(hypothesis's database is off, so every round explores anew); targets take turns until
`--minutes` are spent. A failure is shrunk by hypothesis and reported with its falsifying input.
Prints a table and, last, one JSON line: examples run per decoder, failures found (with messages).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.fuzz_targets import TARGETS, Target  # noqa: E402


def run_round(target: Target, examples: int, round_seed: int, counter: list) -> str | None:
    """Run `target` for up to `examples` examples; return a failure's description, or None."""

    def counted(value) -> None:
        counter[0] += 1
        target.check(value)

    test = seed(round_seed)(settings(max_examples=examples, deadline=None, database=None,
                                     suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                                     print_blob=True)(given(target.strategy)(counted)))
    try:
        test()
    except Exception as error:  # noqa: BLE001 - a failing property is what we look for
        return f"{type(error).__name__}: {str(error)[:400]}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--round-examples", type=int, default=2000)
    parser.add_argument("--first-round-examples", type=int, default=200,
                        help="the first round of every decoder is this short, so that even a short run fuzzes them all")
    parser.add_argument("--target", default="", help="run only targets whose name contains this")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()

    targets = {name: t for name, t in TARGETS.items() if args.target in name}
    if not targets:
        raise SystemExit(f"no target matches {args.target!r}; targets: {', '.join(TARGETS)}")
    rng = random.Random(args.seed)
    examples, seconds, rounds = defaultdict(int), defaultdict(float), defaultdict(int)
    failures: dict[str, list[str]] = defaultdict(list)
    deadline = time.monotonic() + 60 * args.minutes
    while time.monotonic() < deadline:
        for name, target in targets.items():
            if time.monotonic() >= deadline:
                break
            counter, started = [0], time.monotonic()
            size = args.round_examples if rounds[name] else min(args.first_round_examples, args.round_examples)
            failure = run_round(target, size, rng.getrandbits(64), counter)
            examples[name] += counter[0]
            seconds[name] += time.monotonic() - started
            rounds[name] += 1
            if failure and failure not in failures[name]:
                failures[name].append(failure)

    table = Table(title=f"protocol fuzzing, {args.minutes:g} min")
    for column in ("decoder", "examples", "rounds", "examples/s", "failures"):
        table.add_column(column, justify="left" if column == "decoder" else "right")
    for name in targets:
        rate = examples[name] / seconds[name] if seconds[name] else 0.0
        table.add_row(name, str(examples[name]), str(rounds[name]), f"{rate:.0f}", str(len(failures[name])))
    console = Console()
    console.print(table)
    for name, found in failures.items():
        for failure in found:
            console.print(f"[red]failure[/] {name}: {failure}")
    print(json.dumps({"minutes": args.minutes, "examples": dict(examples), "total_examples": sum(examples.values()),
                      "failures": {name: found for name, found in failures.items() if found},
                      "failures_found": sum(len(found) for found in failures.values())}))
    sys.exit(1 if any(failures.values()) else 0)


if __name__ == "__main__":
    main()
