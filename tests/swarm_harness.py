"""Start real peers (separate processes with their own p2pd) on 127.0.0.1 and talk to them."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class LineProcess:
    """A child process whose stdout lines are read by a thread, so waits can time out."""

    def __init__(self, args: List[str], *, stdin: bool = False, cwd: Optional[Path] = None, env: Optional[dict] = None,
                 merge_stderr: bool = True):
        """merge_stderr=False keeps the child's log lines out of the lines waited on: a process that answers
        in long JSON lines on stdout must not have a log line from another thread land inside one (a pipe
        write over PIPE_BUF bytes is not atomic)."""
        self.args = args
        # own process group: a test can kill the process with everything it started, as a crash would
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                                     text=True, bufsize=1, cwd=cwd or ROOT, env=env or child_env(),
                                     start_new_session=True)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.output: List[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True).start()
        if not merge_stderr:
            threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True).start()

    def _pump(self, stream, wanted: bool) -> None:
        for line in stream:
            self.output.append(line)
            if wanted:
                self.lines.put(line)

    def wait_for(self, predicate, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            if predicate(line):
                return line
        raise TimeoutError(f"{self.args[1:4]} produced no matching line; output:\n{''.join(self.output)[-3000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash or `kill -9` of a node would."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def freeze(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def interrupt(self) -> None:
        """Ctrl-C, as a user at the terminal presses it (SIGINT to the process group)."""
        os.killpg(self.proc.pid, signal.SIGINT)


class DhtPeer(LineProcess):
    """tests/peers/dht_peer.py: an honest or adversarial swarm peer answering JSON commands."""

    def __init__(self, manifest_path: Path, initial_peers: List[str] = (), adversary: bool = False):
        args = [sys.executable, "-m", "tests.peers.dht_peer", "--manifest", str(manifest_path)]
        if initial_peers:
            args += ["--initial-peers", *initial_peers]
        if adversary:
            args.append("--adversary")
        super().__init__(args, stdin=True, merge_stderr=False)
        hello = json.loads(self.wait_for(lambda line: line.startswith("{"), timeout=60))
        self.peer_id, self.maddrs = hello["peer_id"], hello["maddrs"]

    def call(self, op: str, timeout: float = 60.0, **fields) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(self.wait_for(lambda line: line.startswith("{"), timeout=timeout))

    def stop(self, timeout: float = 10.0) -> int:
        if self.alive():
            try:
                self.proc.stdin.write('{"op": "quit"}\n')  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
                self.proc.wait(timeout)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                pass
        return super().stop(timeout)


class BootstrapProcess(LineProcess):
    """`ddm-swarm bootstrap` as a user runs it."""

    def __init__(self, manifest_path: Path, identity: Path, port: int = 0, initial_peers: List[str] = (),
                 host: str = "127.0.0.1", prefix: List[str] = (), extra: List[str] = ()):
        super().__init__([*prefix, sys.executable, "-m", "node.cli", "bootstrap", "--swarm", str(manifest_path),
                          "--identity", str(identity), "--host", host, "--port", str(port),
                          *sum([["--initial-peers", p] for p in initial_peers], []), *extra])
        self.maddrs: List[str] = []
        while True:
            line = self.wait_for(lambda l: "--initial-peers" in l or l.startswith("ready"), timeout=60)
            if line.startswith("ready"):
                break
            self.maddrs.append(line.split()[-1])
        self.peer_id = self.maddrs[0].rsplit("/p2p/", 1)[1]


class NodeProcess(LineProcess):
    """`ddm-swarm node` as a user runs it (its log lines are what we read)."""

    def __init__(self, manifest_path: Path, data_dir: Path, initial_peers: List[str], *extra: str,
                 host: str = "127.0.0.1", prefix: List[str] = ()):
        super().__init__([*prefix, sys.executable, "-m", "node.cli", "node", "--swarm", str(manifest_path),
                          "--data-dir", str(data_dir), "--host", host,
                          *sum([["--initial-peers", p] for p in initial_peers], []), *extra], env=child_env(COLUMNS="200"))
        self.data_dir = data_dir


def wait_until(condition, timeout: float, what: str, every: float = 1.0):
    """The first truthy value of `condition()`, polled every `every` s; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_cli(*args: str, timeout: float = 240, prefix: List[str] = ()) -> subprocess.CompletedProcess:
    """Run one `ddm-swarm` command to completion (`prefix`: e.g. `ip netns exec NAME`)."""
    return subprocess.run([*prefix, sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=child_env(COLUMNS="200"))
