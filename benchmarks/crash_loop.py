"""Crash safety under many kills: a real `ddm-swarm node` SIGKILLed at random moments, 20+ times.

    python benchmarks/crash_loop.py [--kills 20] [--seed 0] [--every-steps 4] [--startup-share 0.4]

A bootstrap peer, an observer and a companion node training expert/1 (so the node under test also
mirrors, i.e. downloads, the companion's checkpoints) run on 127.0.0.1. The node under test trains
expert/0 of the tiny test swarm with a checkpoint every `--every-steps` steps; each kill lands a
random time after the node began training, and with probability `--startup-share` its restart is
killed too, a random moment into start-up; so kills hit start-up (resume, re-announcing), training,
checkpoint writing, announcing and mirror downloads. The gaps between a checkpoint's steps (blob
stored, published.json written, announcement queued) last microseconds; the node under test pauses
`--checkpoint-pause-s` in each (a test-only variable, DDM_SWARM_TEST_CHECKPOINT_PAUSE_S) so kills
land there too; `--checkpoint-pause-s 0` gives pure random timing. After
every kill the harness (tests/crash_harness.py) checks the dead node's disk and the DHT, then
restarts it and checks where it resumed. Prints a table and, last, one JSON line: kills, resumes ok,
corrupt blobs found, missing announced blobs, steps lost per kill (from its last lease renewal,
at most one lease period old, to the step it resumed at).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.crash_harness import CrashLoop, KillResult, dumps, run_kills, summary, tiny_crash_manifest  # noqa: E402

# (field of KillResult, column title)
COLUMNS = (("kill", "#"), ("after_s", "after s"), ("phase", "cut off"), ("step_at_kill", "step"),
           ("state_step", "state"), ("announced_step", "announced"), ("resumed_step", "resumed"),
           ("steps_lost", "lost"), ("corrupt_blobs", "corrupt"), ("stray_files", "stray"),
           ("announced_blob_present", "blob on disk"), ("resume_ok", "resume ok"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every-steps", type=int, default=4, help="checkpoint every this many steps")
    parser.add_argument("--low-s", type=float, default=0.5)
    parser.add_argument("--high-s", type=float, default=8.0)
    parser.add_argument("--startup-share", type=float, default=0.4,
                        help="how often a restart is itself killed during its start-up")
    parser.add_argument("--no-companion", action="store_true", help="no second trainer (no mirror downloads)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    parser.add_argument("--checkpoint-pause-s", type=float, default=0.3,
                        help="the node under test pauses this long between a checkpoint's steps (blob stored / "
                             "published.json written / announced), so that kills land in those gaps too; 0: none")
    args = parser.parse_args()
    os.environ["DDM_SWARM_TEST_CHECKPOINT_PAUSE_S"] = str(args.checkpoint_pause_s)  # inherited by the nodes

    console = Console(stderr=True)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="ddm-crash-"))
    workdir.mkdir(parents=True, exist_ok=True)
    manifest = tiny_crash_manifest(REPO / "tests" / "manifests" / "tiny.yaml", workdir / "tiny-crash.yaml",
                                   args.every_steps)
    started = time.monotonic()
    loop = CrashLoop(manifest, workdir, companions=() if args.no_companion else ("expert/1",), seed=args.seed)

    def report(result: KillResult) -> None:
        console.print(f"kill {result.kill:2d} after {result.after_s:5.1f} s in {result.phase:12s} step "
                      f"{result.step_at_kill:4d} -> resumed {result.resumed_step:4d} "
                      f"{'ok' if result.ok else '[red]FAILED[/]'}")

    try:
        results = run_kills(loop, args.kills, args.low_s, args.high_s, startup_share=args.startup_share, report=report)
    finally:
        loop.close()
    table = Table(title=f"{len(results)} SIGKILLs of a training node ({time.monotonic() - started:.0f} s)")
    for field, title in COLUMNS:
        table.add_column(title, justify="left" if field == "phase" else "right")
    for result in results:
        table.add_row(*(str(getattr(result, field)) for field, _ in COLUMNS))
    Console(width=max(Console().width, 120)).print(table)
    figures = summary(results)
    console.print(f"cut off: {', '.join(figures['phases'])}; work dir {workdir}")
    print(dumps(results))
    sys.exit(0 if all(r.ok for r in results) else 1)


if __name__ == "__main__":
    main()
