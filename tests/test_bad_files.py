"""Damaged files and a full disk, met by a real node and a real client of a tiny swarm: a cached
checkpoint that rotted is fetched again, a damaged state file or node.json stops the node with one
line naming the file and what to do, a disk that fills up while a checkpoint is written stops the
node the same way; nothing written before is lost, and the node resumes once the user has fixed it.
The tests run in order on one node (its data dir on a small tmpfs where mounting is permitted).
"""

import errno
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from ddm_models.checkpoint import read_checkpoint
from node.blobs.store import BlobStore
from protocol.records import decode_record
from tests.crash_harness import TRAINING, tiny_crash_manifest
from tests.swarm_harness import ROOT, BootstrapProcess, NodeProcess, run_cli, wait_until

pytestmark = pytest.mark.timeout(600)
TMPFS_BYTES = 48 * 2**20


def mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(path)],
                             capture_output=True)
    return mounted.returncode == 0


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-files")
    manifest = tiny_crash_manifest(ROOT / "tests" / "manifests" / "tiny.yaml", tmp / "tiny.yaml",
                                   checkpoint_every_steps=4)
    data_dir = tmp / "node"
    state = {"tmp": tmp, "manifest": manifest, "data_dir": data_dir, "tmpfs": mount_tmpfs(data_dir),
             "boot": BootstrapProcess(manifest, tmp / "boot.key"), "node": None}
    yield state
    for process in (state["node"], state["boot"]):
        if process is not None:
            process.kill()
    if state["tmpfs"]:
        subprocess.run(["umount", "-l", str(data_dir)], capture_output=True)


def start_node(swarm, *extra: str) -> NodeProcess:
    swarm["node"] = NodeProcess(swarm["manifest"], swarm["data_dir"], swarm["boot"].maddrs, "--job", "expert/0",
                                "--no-mirror", *extra)
    return swarm["node"]


def state_dir(swarm) -> Path:
    return swarm["data_dir"] / "jobs" / "expert-0" / "tiny-fm"


def published(swarm) -> dict:
    path = state_dir(swarm) / "published.json"
    return json.loads(path.read_text()) if path.exists() else {"step": -1}


def exit_status(process: NodeProcess, timeout: float = 240) -> int:
    try:
        process.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        tail = "".join(process.output[-20:])
        raise AssertionError(f"the node did not exit within {timeout:.0f} s; its last lines:\n{tail}") from None
    return process.proc.returncode


class DiskFiller(threading.Thread):
    """Keeps a disk full, as another program writing to it would: every byte that frees up is taken.

    Filling it once is not enough: the node frees what it replaces (the previous state file, older
    blobs), so a fill that lands while a checkpoint's new files are on disk leaves exactly the room
    the next checkpoint needs, and the node trains on (seen: 4 minutes of checkpoints after one fill).
    """

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.done = path, threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while not self.done.is_set():
                size = 2**20
                while size >= 4096:  # take what is free, down to the last page
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError as error:
                        if error.errno != errno.ENOSPC:
                            raise
                        size //= 2
                self.done.wait(0.01)
        finally:
            os.close(fd)


def peers(swarm) -> list:
    return sum([["--initial-peers", p] for p in swarm["boot"].maddrs], [])


def test_a_cached_checkpoint_that_rotted_on_disk_is_fetched_again_and_never_used(swarm):
    node = start_node(swarm, "--max-steps", "8")  # trains to step 8, then only serves: its record stays put
    node.wait_for(lambda line: "[serving]" in line, timeout=300)
    sha = decode_record(bytes.fromhex(published(swarm)["record"])).inference.sha256  # what a generator fetches
    cache = swarm["tmp"] / "client-cache"
    own = BlobStore(swarm["data_dir"] / "blobs")
    rotted = BlobStore(cache / "blobs").put_file(own.path(sha))  # as if an earlier fetch had cached it
    blob = BlobStore(cache / "blobs").path(rotted.sha256)
    data = bytearray(blob.read_bytes())
    data[-7] ^= 0x01  # one bit of one weight: the file still loads, as slightly wrong weights
    blob.write_bytes(bytes(data))
    out = swarm["tmp"] / "ensemble"
    result = run_cli("fetch", "--swarm", str(swarm["manifest"]), "--out", str(out), "--cache-dir", str(cache),
                     *peers(swarm))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "corrupt" in result.stderr and "again" in result.stderr  # said so, quarantined it, fetched it anew
    saved = json.loads((out / "ensemble.json").read_text())["checkpoints"]
    assert [decode_record(bytes.fromhex(entry["record"])).inference.sha256 for entry in saved] == [sha]
    assert (out / saved[0]["file"]).read_bytes() == own.path(sha).read_bytes()


def test_a_damaged_state_file_stops_the_node_naming_it_and_stays_as_it_was(swarm):
    swarm["node"].interrupt()
    assert exit_status(swarm["node"]) == 0
    state = state_dir(swarm) / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-11] ^= 0x01
    state.write_bytes(bytes(data))
    node = start_node(swarm, "--max-steps", "8")
    assert exit_status(node) == 1
    errors = [line for line in node.output if line.startswith("error:")]
    assert errors and str(state) in errors[0] and "Move it away" in errors[0], "".join(node.output)
    assert "Traceback" not in "".join(node.output)
    assert state.read_bytes() == bytes(data)  # left for the user to inspect, never overwritten


def test_without_its_state_file_the_node_resumes_from_its_published_checkpoint(swarm):
    state = state_dir(swarm) / "state.safetensors"
    state.rename(state.with_name("state.safetensors.bad"))  # what the error told the user to do
    last = published(swarm)["step"]
    node = start_node(swarm)
    line = node.wait_for(lambda l: TRAINING.search(l) is not None, timeout=300)
    assert int(TRAINING.search(line).group(2)) == last == 8


def test_a_full_disk_while_writing_a_checkpoint_stops_the_node_clearly_and_loses_nothing(swarm):
    if not swarm["tmpfs"]:
        pytest.skip("mounting a small tmpfs is not permitted here (needs root): no disk to fill")
    node = swarm["node"]
    wait_until(lambda: published(swarm)["step"] >= 12, 240, "a checkpoint after the resume", every=0.5)
    filler = DiskFiller(swarm["data_dir"] / "filler")
    filler.start()
    try:
        assert exit_status(node) == 1
    finally:
        filler.done.set()
        filler.join()
    errors = [line for line in node.output if line.startswith("error:")]
    assert errors and "is full" in errors[0] and str(swarm["data_dir"]) in errors[0], "".join(node.output)
    metadata, _ = read_checkpoint(state_dir(swarm) / "state.safetensors")  # the last state file loads
    last = published(swarm)
    store = BlobStore(swarm["data_dir"] / "blobs")
    assert store.verify(last["blob"]).sha256 == last["blob"]  # the last published checkpoint is intact
    assert last["step"] <= metadata.step <= last["step"] + 4
    assert not list((swarm["data_dir"] / "blobs" / "tmp").iterdir())  # no half-written file left
    assert not list(state_dir(swarm).glob(".*.tmp"))
    filler.path.unlink()  # the user frees space and starts the node again
    node = start_node(swarm)
    line = node.wait_for(lambda l: TRAINING.search(l) is not None, timeout=300)
    assert int(TRAINING.search(line).group(2)) == metadata.step


def test_a_restart_never_announces_a_checkpoint_whose_blob_rotted_away(swarm):
    swarm["node"].kill()
    last = published(swarm)
    blob = BlobStore(swarm["data_dir"] / "blobs").path(last["blob"])
    data = bytearray(blob.read_bytes())
    data[100] ^= 0x01
    blob.write_bytes(bytes(data))
    node = start_node(swarm)
    node.wait_for(lambda l: TRAINING.search(l) is not None, timeout=300)
    output = " ".join("".join(node.output).split())  # log lines may wrap
    assert "quarantined 1 corrupt blob" in output
    assert f"not announcing checkpoint step {last['step']} again" in output


def test_a_damaged_node_json_stops_the_node_naming_it(swarm):
    swarm["node"].kill()
    (swarm["data_dir"] / "node.json").write_text('{"job": "expert/0", "mod')
    node = NodeProcess(swarm["manifest"], swarm["data_dir"], swarm["boot"].maddrs, "--no-mirror")
    swarm["node"] = node
    assert exit_status(node) == 1
    errors = [line for line in node.output if line.startswith("error:")]
    assert errors and str(swarm["data_dir"] / "node.json") in errors[0] and "delete it" in errors[0], \
        "".join(node.output)
