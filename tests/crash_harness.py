"""SIGKILL a real `ddm-swarm node` at random moments, then check what it left behind and how it
comes back. Shared by tests/test_crash_safety.py (a few kills) and benchmarks/crash_loop.py (20+).

After every kill, with the node dead:
- its blob store shows no corrupt or partial blob as complete (`verify_all` finds nothing; every
  file under blobs/ is a complete blob or its digests, nothing else is listed);
- the blob of the latest checkpoint record it announced (read from the DHT) is in its store;
- its state file, if any, loads as a valid checkpoint.
After every restart: it resumes at the step of that state file (or, without one, from the swarm's
checkpoint of its job), and trains on.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

import yaml

from ddm_models.checkpoint import InvalidCheckpoint, read_checkpoint
from node.blobs.store import BlobStore
from node.identity_files import load_identity
from node.swarm.manifest_files import write_manifest_file
from protocol.hashing import is_sha256_hex
from protocol.manifest import SwarmManifest
from protocol.records import decode_record
from tests.swarm_harness import BootstrapProcess, DhtPeer, NodeProcess, wait_until
from protocol.jobs import Job

TRAINING = re.compile(r"\[training\] (\S+) step (\d+)")
STARTUP_TIMEOUT_S = 300.0


@dataclass
class KillResult:
    kill: int
    after_s: float  # how long the node had run when it was killed
    phase: str  # what was in progress: startup, training, or writes found cut off on disk
    step_at_kill: int  # at least: its last lease renewal, log line or state file (a lease period old at most)
    state_step: int  # step of the state file it left (-1: none yet)
    announced_step: int  # step of its latest checkpoint record in the DHT (-1: none yet)
    announced_blob_present: bool  # that record's blob is complete and verified in its store
    corrupt_blobs: int  # blobs that failed verification (must be 0)
    stray_files: int  # files under blobs/ that are neither a complete blob nor its digests (must be 0)
    resumed_step: int = -1  # the step its restart resumed from
    resume_ok: bool = False  # resumed exactly where its state file (or the swarm) left it
    steps_lost: int = 0  # step_at_kill - resumed_step

    @property
    def ok(self) -> bool:
        return (self.resume_ok and self.announced_blob_present and self.corrupt_blobs == 0
                and self.stray_files == 0)


def tiny_crash_manifest(source: Path, out: Path, checkpoint_every_steps: int) -> Path:
    """`source` with checkpoints every few steps, so kills often land in checkpoint writing."""
    data = yaml.safe_load(Path(source).read_text())
    data["timing"]["checkpoint_every_steps"] = checkpoint_every_steps
    write_manifest_file(SwarmManifest.from_dict(data), out)
    return out


class CrashLoop:
    """A bootstrap peer, an observer, optional companion nodes, and the node under test."""

    def __init__(self, manifest_path: Path, workdir: Path, job: str = "expert/0", companions: tuple = (),
                 seed: int = 0):
        self.manifest_path, self.workdir, self.job = manifest_path, Path(workdir), job
        self.rng = random.Random(seed)
        self.cluster = Job.parse(job).cluster
        self.boot = BootstrapProcess(manifest_path, self.workdir / "boot.key")
        self.others = [NodeProcess(manifest_path, self.workdir / f"companion-{i}", self.boot.maddrs, "--job", other)
                       for i, other in enumerate(companions)]
        self.observer = DhtPeer(manifest_path, self.boot.maddrs)
        self.data_dir = self.workdir / "victim"
        self.node: Optional[NodeProcess] = None
        self.results: List[KillResult] = []

    def close(self) -> None:
        for process in [self.node, *self.others, self.observer, self.boot]:
            if process is not None:
                process.kill()

    # --- the node under test -----------------------------------------------------------------
    def launch(self) -> None:
        self.node = NodeProcess(self.manifest_path, self.data_dir, self.boot.maddrs, "--job", self.job)
        self.started = time.monotonic()

    def wait_training(self) -> int:
        """Wait for the node's first "[training]" line; return the step it resumed at."""
        line = self.node.wait_for(lambda l: TRAINING.search(l) is not None, timeout=STARTUP_TIMEOUT_S)
        self.training_since = time.monotonic()
        self.startup_s = self.training_since - self.started
        return int(TRAINING.search(line).group(2))

    def start(self) -> int:
        self.launch()
        return self.wait_training()

    def signer(self) -> str:
        return load_identity(self.data_dir / "identity.pem").signer_id

    def _own_records(self, family: str, **extra) -> list:
        reply = self.observer.call("read", family=family, **extra)
        records = [decode_record(bytes.fromhex(h)) for h in reply["records"]]
        return [r for r in records if r.signer == self.signer()]

    def _step_now(self) -> int:
        claims = [c for c in self._own_records("claims") if str(c.job) == self.job]
        return max((c.step for c in claims), default=0)

    def wait_announced(self) -> float:
        """Wait until the node has a checkpoint record above step 0 in the DHT; return when (monotonic)."""
        wait_until(lambda: any(r.step > 0 for r in self._own_records("checkpoints", cluster=self.cluster)),
                   STARTUP_TIMEOUT_S, "the node's first announced checkpoint", every=0.5)
        return time.monotonic()

    def kill_at(self, origin: float, delay_s: float) -> KillResult:
        """SIGKILL the node `delay_s` after `origin` (a monotonic time), then inspect what it left."""
        time.sleep(max(0.0, origin + delay_s - time.monotonic()))
        step = self._step_now() if (self.data_dir / "identity.pem").exists() else 0
        logged = [int(m.group(2)) for m in map(TRAINING.search, list(self.node.output)) if m]
        self.node.kill()
        result = self.inspect(len(self.results), time.monotonic() - self.started, max([step, *logged]), bool(logged))
        result.step_at_kill = max(result.step_at_kill, result.state_step)  # the best lower bound we can see
        self.results.append(result)
        return result

    def restart(self, result: KillResult) -> KillResult:
        """Start the node again; check it resumed where its state file (or the swarm) left it."""
        self.launch()
        return self.check_resume(result)

    def check_resume(self, result: KillResult) -> KillResult:
        result.resumed_step = self.wait_training()
        expected = result.state_step if result.state_step >= 0 else max(result.announced_step, 0)
        result.resume_ok = result.resumed_step == expected
        result.steps_lost = max(0, result.step_at_kill - result.resumed_step)
        return result

    # --- what the dead node left -------------------------------------------------------------
    def inspect(self, kill: int, after_s: float, step_at_kill: int, trained: bool) -> KillResult:
        store = BlobStore(self.data_dir / "blobs")
        stray = [p for p in (self.data_dir / "blobs" / "blobs").rglob("*")
                 if p.is_file() and not (is_sha256_hex(p.name) or (p.suffix == ".digests" and is_sha256_hex(p.stem)))]
        corrupt = store.verify_all()
        announced = self._own_records("checkpoints", cluster=self.cluster) if (self.data_dir / "identity.pem").exists() \
            else []
        latest = max(announced, key=lambda r: (r.step, r.created_at), default=None)
        present = latest is None or all(store.has(ref.sha256) and _verifies(store, ref.sha256)
                                        for ref in (latest.blob, latest.inference))  # the state and its export
        announced_step = latest.step if latest else -1
        return KillResult(kill, round(after_s, 1), self._phase(trained, announced_step), step_at_kill,
                          self._state_step(), announced_step, present, len(corrupt), len(stray))

    def _state_files(self) -> list:
        return list((self.data_dir / "jobs").rglob("state.safetensors")) if (self.data_dir / "jobs").exists() else []

    def _state_step(self) -> int:
        files = self._state_files()
        if not files:
            return -1
        try:
            metadata, _ = read_checkpoint(files[0])
        except InvalidCheckpoint:
            return -2  # a torn state file: the harness reports it as a failed resume
        return metadata.step

    def _phase(self, trained: bool, announced_step: int) -> str:
        """What the kill cut off: writes leave their temporary files behind, a download its partial
        files, an announcement a published.json newer than the node's record in the DHT. Only files
        this run of the node touched count (a run killed early has not cleared older ones yet)."""
        since = time.time() - (time.monotonic() - self.started)

        def touched(folder: Path, pattern: str) -> bool:
            return folder.exists() and any(p.stat().st_mtime >= since for p in folder.rglob(pattern))

        cut = []
        jobs = self.data_dir / "jobs"
        if touched(jobs, ".state.safetensors.*"):
            cut.append("state write")
        if touched(self.data_dir / "blobs" / "tmp", "*"):
            cut.append("blob write")
        if touched(jobs, ".published.json.*"):
            cut.append("published.json")
        if touched(self.data_dir / "blobs" / "partial", "*"):
            cut.append("download")
        published = list(jobs.rglob("published.json")) if jobs.exists() else []
        published_step = json.loads(published[0].read_text())["step"] if published else -1
        if published_step > announced_step:
            cut.append("announce")
        if self._unpublished_blob(published_step):
            cut.append("publish")
        return "+".join(cut) or ("training" if trained else "startup")

    def _unpublished_blob(self, published_step: int) -> bool:
        """Whether the store holds this node's checkpoint of a step newer than its published.json."""
        store = BlobStore(self.data_dir / "blobs")
        for sha in store.list():
            header = _safetensors_header(store.path(sha))
            if header.get("kind") == "expert" and header.get("cluster") == str(self.cluster) \
                    and int(header.get("step", -1)) > published_step:
                return True
        return False


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        return json.loads(file.read(length)).get("__metadata__") or {}


def _verifies(store: BlobStore, sha256: str) -> bool:
    try:
        store.verify(sha256)
        return True
    except Exception:  # CorruptBlob, or the blob vanished
        return False


def run_kills(loop: CrashLoop, kills: int, low_s: float, high_s: float, startup_share: float = 0.0,
              report: Callable[[KillResult], None] = lambda result: None) -> List[KillResult]:
    """Start the node, then until `kills` kills: kill it a random [low_s, high_s] after it began
    training, and restart it. With probability `startup_share`, that restart is itself killed a
    random moment into its start-up (resume, downloads, re-announcing) and the node restarted once
    more; the kill before it then counts as resumed only if nothing it left was lost meanwhile."""
    loop.start()
    while len(loop.results) < kills:
        origin = loop.training_since
        if loop.results and not any(r.announced_step > 0 for r in loop.results):
            # on a loaded machine every kill so far may have come before the first announce: the
            # later ones then start their random delay once the node has announced
            origin = loop.wait_announced()
        result = loop.kill_at(origin, loop.rng.uniform(low_s, high_s))
        if len(loop.results) < kills and loop.rng.random() < startup_share:
            loop.launch()
            during = loop.kill_at(loop.started, loop.rng.uniform(0.5, loop.startup_s + 1.0))
            loop.restart(during)
            result.resumed_step, result.steps_lost = during.resumed_step, max(0, result.step_at_kill - during.resumed_step)
            result.resume_ok = during.resume_ok and during.state_step >= result.state_step
            report(result)
            report(during)
        else:
            loop.restart(result)
            report(result)
    return loop.results


def summary(results: List[KillResult]) -> dict:
    return {"kills": len(results), "resumes_ok": sum(r.resume_ok for r in results),
            "corrupt_blobs_found": sum(r.corrupt_blobs for r in results),
            "stray_files_found": sum(r.stray_files for r in results),
            "missing_announced_blobs": sum(not r.announced_blob_present for r in results),
            "steps_lost_per_kill": [r.steps_lost for r in results],
            "phases": sorted({r.phase for r in results}),
            "results": [asdict(r) for r in results]}


def dumps(results: List[KillResult]) -> str:
    return json.dumps(summary(results))
