"""The status page, as a browser shows it: a real bootstrap peer serving `--web`, a real node training
one job of the tiny swarm, and headless Chromium (Debian's `chromium`) rendering the page.

Set DDM_SWARM_WEB_SCREENSHOT=path.png to keep the screenshot the test takes.
"""

import json
import os
import shutil
import subprocess
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from node.web.history import StatusHistory
from node.web.page import render
from tests.swarm_harness import ROOT, BootstrapProcess, NodeProcess, wait_until

MANIFEST = ROOT / "tests" / "manifests" / "tiny.yaml"
JOBS = ("expert/0", "expert/1", "router")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", "--disable-dev-shm-usage", *args],
                          capture_output=True, text=True, timeout=120)


class Rows(HTMLParser):
    """The `data-job` rows of the jobs table and the text inside each."""

    def __init__(self):
        super().__init__()
        self.rows, self._current = {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-job" in attrs:
            self._current = attrs["data-job"]
            self.rows[self._current] = ""

    def handle_endtag(self, tag):
        if tag == "tr":
            self._current = None

    def handle_data(self, data):
        if self._current is not None:
            self.rows[self._current] += data + " "


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    boot = BootstrapProcess(MANIFEST, tmp / "boot.key", extra=["--web", "0"])
    url = next(line.split()[-1] for line in boot.output if line.startswith("status page:"))
    node = NodeProcess(MANIFEST, tmp / "node", boot.maddrs, "--job", "expert/0", "--max-steps", "100000",
                       "--no-mirror")
    try:
        yield {"url": url, "boot": boot, "node": node, "tmp": tmp}
    finally:
        node.stop()
        boot.stop()


def test_page_of_a_history_escapes_what_peers_wrote():
    history = StatusHistory()
    snapshot = {"swarm": "s", "swarm_id": "0" * 64, "protocol_version": 2, "coverage": "0/1", "online_peers": 1,
                "warnings": [], "time": 0.0, "validator": {"refused": {}},
                "jobs": [{"job": "expert/0", "trainers": [], "latest_step": None, "samples_seen": None,
                          "heldout": None, "model": None, "providers": 0, "inference_providers": 0, "age_s": None}],
                "peers": [{"peer_id": "Qm<script>", "role": "trainer", "job": "", "state": "online",
                           "software": "<b>evil</b>", "maddrs": ["/ip4/1.2.3.4/tcp/1"], "reachability": "public"}]}
    history.add(snapshot)
    page = render(history.view(), {"state": "none", "message": "", "made_at": None, "prompts": [], "steps": 8})
    assert "<script>" not in page and "&lt;b&gt;evil&lt;/b&gt;" in page


def test_successive_snapshots_give_join_takeover_and_refusal_events():
    history = StatusHistory()
    base = {"swarm": "s", "swarm_id": "0" * 64, "protocol_version": 2, "coverage": "1/1", "online_peers": 1,
            "warnings": []}
    job = {"job": "expert/0", "latest_step": 40, "heldout": 0.5}
    history.add({**base, "time": 1.0, "validator": {"refused": {}}, "peers": [],
                 "jobs": [{**job, "trainers": ["aaaa"]}]})
    peer = {"peer_id": "Qmpeer", "role": "trainer", "job": "expert/0", "state": "training"}
    events = history.add({**base, "time": 2.0, "validator": {"refused": {"BadSignature": 3}}, "peers": [peer],
                          "jobs": [{**job, "latest_step": 80, "heldout": 0.4, "trainers": ["bbbb"]}]})
    assert [e.kind for e in events] == ["join", "takeover", "refused"]
    assert history.view()["jobs"][0]["history"] == [[1.0, 40, 0.5], [2.0, 80, 0.4]]


def test_a_peer_missing_from_one_snapshot_is_no_event_but_missing_from_two_is_a_leave():
    history = StatusHistory()
    peer = {"peer_id": "Qmpeer", "role": "trainer", "job": "", "state": "training"}

    def snapshot(at, *peers):
        return {"time": at, "validator": {"refused": {}}, "jobs": [], "peers": list(peers)}

    assert history.add(snapshot(1.0, peer)) == []
    assert history.add(snapshot(2.0)) == []  # a DHT read that missed it
    assert history.add(snapshot(3.0, peer)) == []  # it was there all along
    assert history.add(snapshot(4.0)) == []
    assert [e.kind for e in history.add(snapshot(5.0))] == ["leave"]
    assert history.add(snapshot(6.0)) == []


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)")
def test_page_shows_every_job_with_its_trainer_progress_plot_and_samples_in_a_browser(swarm, tmp_path):
    api = swarm["url"] + "api/status"
    def expert0() -> dict:
        return next((job for job in get_json(api)["jobs"] if job["job"] == "expert/0"), {})

    wait_until(lambda: (expert0().get("latest_step") or 0) >= 80 and len(expert0()["history"]) >= 2, 420,
               "two checkpoints of expert/0 on the page")
    status = get_json(api)
    assert [job["job"] for job in status["jobs"]] == list(JOBS)
    expert0 = status["jobs"][0]
    assert expert0["trainers"] and expert0["samples_seen"] >= 80 and expert0["inference_providers"] >= 1
    assert any(event["kind"] == "join" and "trainer" in event["text"] for event in status["events"])
    assert {peer["role"] for peer in status["peers"]} >= {"bootstrap", "trainer"}
    urllib.request.urlopen(urllib.request.Request(swarm["url"] + "samples", method="POST"), timeout=10)
    wait_until(lambda: get_json(api)["samples"]["state"] in ("ready", "failed"), 300, "a sample grid")
    assert get_json(api)["samples"]["state"] == "ready", get_json(api)["samples"]["message"]

    dom = chromium("--dump-dom", swarm["url"])
    assert dom.returncode == 0, dom.stderr[-2000:]
    rows = Rows()
    rows.feed(dom.stdout)
    assert set(rows.rows) == set(JOBS)  # every job of the manifest, trained or not
    assert expert0["trainers"][0] in rows.rows["expert/0"] and "tiny-fm" in rows.rows["expert/0"]
    assert "checkpoints ·" in rows.rows["expert/0"]  # the plot's label: its point count and range
    assert "none" in rows.rows["expert/1"] and "no checkpoint yet" in rows.rows["router"]
    assert '<svg class="plot"' in dom.stdout and 'src="/samples.png' in dom.stdout
    assert "http://" not in dom.stdout.replace(swarm["url"], "").replace("http://www.w3.org/2000/svg", "")

    shot = Path(os.environ.get("DDM_SWARM_WEB_SCREENSHOT") or tmp_path / "status.png")
    result = chromium(f"--screenshot={shot}", "--window-size=1400,1100", swarm["url"])
    assert result.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", result.stderr[-2000:]
