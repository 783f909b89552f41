"""Crash safety of a real node process: SIGKILL at random moments of training, checkpoint writing,
announcing and start-up, then restart (a few kills here; benchmarks/crash_loop.py does 20+).
One loop runs per module; each test checks one promise over every kill of it.
"""

import pytest

from tests.crash_harness import CrashLoop, run_kills, tiny_crash_manifest
from tests.swarm_harness import ROOT

pytestmark = pytest.mark.timeout(900)
KILLS = 3


@pytest.fixture(scope="module")
def kills(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    manifest = tiny_crash_manifest(ROOT / "tests" / "manifests" / "tiny.yaml", tmp / "tiny-crash.yaml",
                                   checkpoint_every_steps=4)
    loop = CrashLoop(manifest, tmp, seed=7)
    try:
        yield run_kills(loop, KILLS, low_s=1.0, high_s=8.0, startup_share=0.5)
    finally:
        loop.close()


def test_no_corrupt_or_partial_blob_is_visible_after_any_kill(kills):
    assert len(kills) == KILLS
    assert [(k.corrupt_blobs, k.stray_files) for k in kills] == [(0, 0)] * KILLS


def test_the_blob_of_the_latest_announced_checkpoint_is_on_disk_after_any_kill(kills):
    assert all(k.announced_blob_present for k in kills), kills
    assert any(k.announced_step > 0 for k in kills)  # the node did announce checkpoints in between


def test_every_restart_resumes_at_the_step_its_state_file_holds(kills):
    assert all(k.resume_ok for k in kills), [(k.state_step, k.resumed_step) for k in kills]
    assert kills[-1].resumed_step > 0  # training really continued across the kills
