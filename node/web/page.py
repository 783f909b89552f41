"""The status page as one self-contained HTML document: tables, inline SVG plots, no script, no
stylesheet or font from anywhere (a status page must work on a machine without internet, and must not
tell a CDN who watches the swarm). It reloads itself every `REFRESH_S` seconds.

Everything that came from the network (peer ids, addresses, software strings, model names, refusal
reasons) is escaped before it is written into the page.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any, Dict, List

REFRESH_S = 5
PLOT_W, PLOT_H = 240, 64

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2330; background: #f7f8fa; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; background: #fff; } td, th { padding: 4px 10px; border-bottom: 1px solid #e3e6eb; }
th { text-align: left; background: #eef1f5; font-weight: 600; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #6b7280; } .warn { color: #a15c00; } .bad { color: #b42318; } .ok { color: #067647; }
.pill { display: inline-block; padding: 0 6px; border-radius: 8px; background: #eef1f5; font-size: 12px; }
code { font-size: 12px; } .grid img { image-rendering: pixelated; border: 1px solid #e3e6eb; background: #fff; }
"""


def render(view: Dict[str, Any], samples: Dict[str, Any]) -> str:
    """The page for a `StatusHistory.view()` and a `SampleGrid.describe()`."""
    head = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="refresh" content="{REFRESH_S}"><title>ddm-swarm status</title>'
            f"<style>{STYLE}</style></head><body>")
    if not view.get("ready"):
        return head + "<h1>ddm-swarm status</h1><p>reading the swarm's records…</p></body></html>"
    parts = [head, _summary(view), "<h2>Jobs</h2>", _jobs(view["jobs"], view.get("time", time.time())),
             "<h2>Peers</h2>", _peers(view["peers"]), "<h2>Recent events</h2>", _events(view["events"]),
             "<h2>Samples of the current ensemble</h2>", _samples(samples), "</body></html>"]
    return "".join(parts)


def _summary(view: Dict[str, Any]) -> str:
    refused = sum(view.get("validator", {}).get("refused", {}).values())
    warnings = "".join(f'<p class="warn">warning: {escape(w)}</p>' for w in view.get("warnings", []))
    return (f"<h1>Swarm <b>{escape(view['swarm'])}</b></h1>"
            f'<p class="muted">id <code>{escape(view["swarm_id"])}</code> · protocol v{int(view["protocol_version"])}'
            f' · refreshes every {REFRESH_S} s · <a href="/api/status">/api/status</a></p>'
            f'<p>coverage <b id="coverage">{escape(view["coverage"])}</b> jobs trained · '
            f'<b>{int(view["online_peers"])}</b> peers online · <b>{refused}</b> records refused by this peer</p>'
            + warnings)


def _jobs(jobs: List[Dict[str, Any]], now: float) -> str:
    rows = ["<table id=\"jobs\"><tr><th>job</th><th>trainers</th><th>model</th><th>step</th><th>images seen</th>"
            "<th>held-out</th><th>held-out over time</th><th>providers (state / export)</th><th>age</th></tr>"]
    for job in jobs:
        trainers = ", ".join(escape(t) + "…" for t in job["trainers"]) or '<span class="bad">none</span>'
        heldout = "-" if job["heldout"] is None else f"{job['heldout']:.4f}"
        metric = "accuracy" if job["job"] == "router" else "loss"
        age = "-" if job["age_s"] is None else _age(job["age_s"])
        rows.append(
            f'<tr class="job" data-job="{escape(job["job"])}"><td><b>{escape(job["job"])}</b></td><td>{trainers}</td>'
            f'<td>{escape(job["model"] or "-")}</td><td class="n">{_number(job["latest_step"])}</td>'
            f'<td class="n">{_number(job.get("samples_seen"))}</td><td class="n">{heldout} '
            f'<span class="muted">{metric}</span></td><td>{plot(job.get("history", []))}</td>'
            f'<td class="n">{int(job["providers"])} / {int(job.get("inference_providers", 0))}</td>'
            f'<td class="n">{age}</td></tr>')
    return "".join(rows) + "</table>"


def plot(history: List[list]) -> str:
    """An inline SVG line of [(time, step, metric)] points: metric against time, min and max labelled."""
    if not history:
        return '<span class="muted">no checkpoint yet</span>'
    times, values = [p[0] for p in history], [p[2] for p in history]
    t0, t1, low, high = min(times), max(times), min(values), max(values)
    span_t, span_v = (t1 - t0) or 1.0, (high - low) or 1.0
    pad = 4

    def xy(point) -> str:
        x = pad + (point[0] - t0) / span_t * (PLOT_W - 2 * pad) if len(history) > 1 else PLOT_W / 2
        y = pad + (1 - (point[2] - low) / span_v) * (PLOT_H - 2 * pad - 12)
        return f"{x:.1f},{y:.1f}"

    points = " ".join(xy(p) for p in history)
    dots = "".join(f'<circle cx="{xy(p).split(",")[0]}" cy="{xy(p).split(",")[1]}" r="2" fill="#2f6fdf"/>'
                   for p in history[-1:])
    return (f'<svg class="plot" width="{PLOT_W}" height="{PLOT_H}" viewBox="0 0 {PLOT_W} {PLOT_H}" '
            f'xmlns="http://www.w3.org/2000/svg"><rect width="100%" height="100%" fill="#fff" stroke="#e3e6eb"/>'
            f'<polyline fill="none" stroke="#2f6fdf" stroke-width="1.5" points="{points}"/>{dots}'
            f'<text x="{PLOT_W - pad}" y="{PLOT_H - 3}" font-size="10" text-anchor="end" fill="#6b7280">'
            f'{len(history)} checkpoints · {low:.4g}–{high:.4g}</text></svg>')


def _peers(peers: List[Dict[str, Any]]) -> str:
    rows = ['<table id="peers"><tr><th>peer</th><th>role</th><th>job</th><th>state</th><th>reachability</th>'
            "<th>addresses</th><th>software</th></tr>"]
    for peer in sorted(peers, key=lambda p: (p["role"], p["job"], p["peer_id"])):
        reach = peer.get("reachability", "none")
        css = {"public": "ok", "relayed": "warn", "none": "bad"}.get(reach, "muted")
        maddrs = "<br>".join(f"<code>{escape(m)}</code>" for m in peer.get("maddrs", [])[:4]) or "-"
        rows.append(f'<tr><td><code>{escape(peer["peer_id"][:20])}…</code></td><td>{escape(peer["role"])}</td>'
                    f'<td>{escape(peer["job"] or "-")}</td><td><span class="pill">{escape(peer["state"])}</span></td>'
                    f'<td class="{css}">{escape(reach)}</td><td>{maddrs}</td><td>{escape(peer["software"])}</td></tr>')
    return "".join(rows) + "</table>"


def _events(events: List[Dict[str, Any]]) -> str:
    if not events:
        return '<p class="muted">nothing happened since this page started watching</p>'
    rows = ['<table id="events"><tr><th>when</th><th>what</th><th></th></tr>']
    for event in events[:30]:
        when = time.strftime("%H:%M:%S", time.gmtime(event["at"]))
        css = {"refused": "bad", "leave": "warn", "takeover": "warn"}.get(event["kind"], "")
        rows.append(f'<tr><td class="muted">{when} UTC</td><td class="{css}">{escape(event["kind"])}</td>'
                    f"<td>{escape(event['text'])}</td></tr>")
    return "".join(rows) + "</table>"


def _samples(samples: Dict[str, Any]) -> str:
    button = ('<form method="post" action="/samples"><button type="submit">sample the ensemble now</button> '
              f'<span class="muted">{len(samples["prompts"])} prompts × 2 at {int(samples["steps"])} steps, '
              "made in the background</span></form>")
    state, body = samples["state"], ""
    if samples["made_at"] is not None:  # the last grid stays while a new one is made
        made = time.strftime("%H:%M:%S", time.gmtime(samples["made_at"]))
        prompts = ", ".join(escape(p) for p in samples["prompts"])
        body = (f'<div class="grid"><img src="/samples.png?t={int(samples["made_at"])}" alt="samples"></div>'
                f'<p class="muted">one row per prompt ({prompts}); made {made} UTC</p>')
    if state == "none":
        body += '<p class="muted">no samples yet</p>'
    elif state != "ready":
        css = "bad" if state == "failed" else "muted"
        body += f'<p class="{css}" id="samples-state">{escape(state)}: {escape(samples["message"])}</p>'
    return body + button


def _number(value) -> str:
    return "-" if value is None else f"{int(value):,}"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
