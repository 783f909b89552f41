"""What the status page remembers between snapshots: each job's held-out metric over time and the
swarm's recent events, both bounded, since a status server may run for weeks.

Events are not read from anywhere: they are the differences between successive snapshots of
`node.swarm.status.collect_status` (a peer record that appears is a join; one that turns "offline"
or disappears, a leave; a job whose trainers change, a takeover) and the growth of this peer's
validator's refusal counters (records refused, by reason). A DHT read under load sometimes misses a
record that is still there, so a peer (or trainer) must be absent from two snapshots in a row to
have left (unless its record says "offline"), and absent from the two before to have joined: a
one-snapshot gap is no event.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Deque, Dict, List, Optional, Set

MAX_POINTS = 240  # per job: at one snapshot every few seconds, the last few hours at most
MAX_EVENTS = 100


@dataclass(frozen=True)
class Event:
    """One thing that happened, as seen between two snapshots; `at` in DHT time (seconds)."""

    at: float
    kind: str  # "join", "leave", "takeover", "trainer" (a job claimed), "refused"
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


class StatusHistory:
    """The latest snapshot, per-job metric series [(time, step, metric)] and recent events (thread-safe:
    the collector writes, request handlers read)."""

    def __init__(self, max_points: int = MAX_POINTS, max_events: int = MAX_EVENTS):
        self._lock = threading.Lock()
        self.latest: Optional[Dict[str, Any]] = None
        self._before_latest: Optional[Dict[str, Any]] = None
        self.series: Dict[str, Deque[tuple]] = {}
        self.events: Deque[Event] = deque(maxlen=max_events)
        self._max_points = max_points

    def add(self, snapshot: Dict[str, Any]) -> List[Event]:
        """Record a new snapshot; the events it reveals against the one before (also kept)."""
        with self._lock:
            earlier, previous = self._before_latest, self.latest
            self._before_latest, self.latest = previous, snapshot
            at = float(snapshot.get("time", 0.0))
            for job in snapshot["jobs"]:
                points = self.series.setdefault(job["job"], deque(maxlen=self._max_points))
                if job["heldout"] is not None and (not points or points[-1][1] != job["latest_step"]):
                    points.append((at, job["latest_step"], float(job["heldout"])))
            events = _events_between(earlier or previous, previous, snapshot, at) if previous is not None else []
            self.events.extend(events)
            return events

    def view(self) -> Dict[str, Any]:
        """A JSON-ready copy: the snapshot with each job's series, and the events, newest first."""
        with self._lock:
            if self.latest is None:
                return {"ready": False, "jobs": [], "peers": [], "events": []}
            jobs = [{**job, "history": [list(point) for point in self.series.get(job["job"], ())]}
                    for job in self.latest["jobs"]]
            return {**self.latest, "ready": True, "jobs": jobs,
                    "events": [event.to_dict() for event in reversed(self.events)]}


def _online(snapshot: Dict[str, Any]) -> Dict[str, dict]:
    return {p["peer_id"]: p for p in snapshot["peers"] if p["state"] != "offline"}


def _trainers(snapshot: Dict[str, Any]) -> Dict[str, Set[str]]:
    return {job["job"]: set(job["trainers"]) for job in snapshot["jobs"]}


def _events_between(earlier: Dict[str, Any], before: Dict[str, Any], after: Dict[str, Any], at: float) -> List[Event]:
    """Events of `after` against the two snapshots before it (`earlier` is `before` at the start)."""
    events = []
    seen, was, now = _online(earlier), _online(before), _online(after)
    for peer_id in sorted(now.keys() - was.keys() - seen.keys()):
        peer = now[peer_id]
        events.append(Event(at, "join", f"{peer['role']} {peer_id[:16]}… joined"
                                        + (f" for {peer['job']}" if peer["job"] else "")))
    gone = {p["peer_id"] for p in after["peers"] if p["state"] == "offline"} & was.keys()  # said goodbye
    gone |= (seen.keys() - was.keys() - now.keys()) if earlier is not before else set()  # missing twice
    for peer_id in sorted(gone):
        events.append(Event(at, "leave", f"{(was.get(peer_id) or seen[peer_id])['role']} {peer_id[:16]}… left"))
    trainers_earlier, trainers_before = _trainers(earlier), _trainers(before)
    for job in after["jobs"]:
        old = trainers_before.get(job["job"], set()) | trainers_earlier.get(job["job"], set())
        new = set(job["trainers"]) - old
        if new and old - set(job["trainers"]):
            events.append(Event(at, "takeover", f"{job['job']} taken over by {', '.join(sorted(new))}"))
        elif new:
            events.append(Event(at, "trainer", f"{job['job']} claimed by {', '.join(sorted(new))}"))
    refused_before = before.get("validator", {}).get("refused", {})
    for reason, count in sorted(after.get("validator", {}).get("refused", {}).items()):
        if count > refused_before.get(reason, 0):
            events.append(Event(at, "refused", f"{count - refused_before.get(reason, 0)} record(s) refused: {reason}"))
    return events
