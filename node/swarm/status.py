"""`ddm-swarm status`: who trains what, coverage, progress and providers, read from the DHT (the web
page of `status --serve` renders the same snapshot, see `node.web`)."""

from __future__ import annotations

from typing import Any, Dict

from hivemind.utils.timed_storage import get_dht_time
from rich.markup import escape
from rich.table import Table

from node.swarm.leases import live_claimers
from node.swarm.membership import SwarmMembership
from protocol.limits import PROTOCOL_VERSION
from protocol.records import SERVING_STATES


def collect_status(membership: SwarmMembership) -> Dict[str, Any]:
    """A JSON-ready snapshot of the swarm as this peer sees it now."""
    manifest, now = membership.manifest, get_dht_time()
    holders = live_claimers(membership.claims(), now)
    jobs = []
    for job in manifest.jobs:
        records = membership.job_checkpoints(job)
        best = max(records, key=lambda r: (r.step, -r.created_at), default=None)
        jobs.append({
            "job": str(job),
            "claims": len(holders.get(job, [])),
            "trainers": sorted(s[:12] for s in holders.get(job, [])),
            "checkpoints": len(records),
            "latest_step": best.step if best else None,
            "samples_seen": best.samples_seen if best else None,
            "heldout": (getattr(best, "heldout_loss", None) if not job.is_router
                        else getattr(best, "heldout_accuracy", None)) if best else None,
            "model": best.model if best else None,
            "providers": len(membership.providers(best.blob)) if best else 0,
            "inference_providers": len(membership.providers(best.inference)) if best else 0,
            "signer": best.signer[:12] if best else None,
            "age_s": round(now - best.created_at, 1) if best else None,
        })
    peers = [{"peer_id": p.peer_id, "role": p.role, "job": str(p.job or ""), "state": p.state, "software": p.software,
              "maddrs": list(p.maddrs), "reachability": reachability(p.maddrs)}
             for p in membership.peers()]
    covered = sum(1 for j in jobs if j["claims"] > 0)
    return {"swarm": manifest.name, "swarm_id": manifest.swarm_id, "protocol_version": PROTOCOL_VERSION,
            "jobs": jobs, "coverage": f"{covered}/{len(jobs)}", "peers": peers,
            "online_peers": sum(1 for p in peers if p["state"] in SERVING_STATES),
            "warnings": membership.beacon_problems(), "validator": membership.validator_stats(), "time": now}


def reachability(maddrs) -> str:
    """What a peer's announced multiaddrs say about reaching it: "relayed" (only through a circuit
    relay), "public" (a global address), "local" (loopback or private addresses only), "none"."""
    import ipaddress

    if not maddrs:
        return "none"
    kinds = set()
    for maddr in maddrs:
        parts = str(maddr).split("/")
        if "p2p-circuit" in parts:
            kinds.add("relayed")
            continue
        if len(parts) > 2 and parts[1] in ("dns", "dns4", "dns6"):
            kinds.add("public")
            continue
        try:
            address = ipaddress.ip_address(parts[2]) if len(parts) > 2 and parts[1] in ("ip4", "ip6") else None
        except ValueError:
            address = None
        kinds.add("public" if address is not None and address.is_global else "local")
    return next(kind for kind in ("public", "relayed", "local") if kind in kinds)


def status_tables(status: Dict[str, Any]) -> list:
    """The jobs and peers tables. Every cell comes from peers' records (a `software` of "[/]"), so each
    is escaped: printed as text, never read as rich markup."""
    title = escape(f"swarm '{status['swarm']}' {status['swarm_id'][:12]}… protocol v{status['protocol_version']} — "
             f"coverage {status['coverage']}, {status['online_peers']} peers online")
    jobs = Table(title=title)
    for column in ("job", "claims", "trainers", "latest step", "held-out", "model", "providers", "age"):
        jobs.add_column(column, justify="right" if column in ("claims", "latest step", "providers") else "left")
    for job in status["jobs"]:
        heldout = "-" if job["heldout"] is None else f"{job['heldout']:.4f}"
        age = "-" if job["age_s"] is None else f"{job['age_s']:.0f}s"
        jobs.add_row(*map(escape, (job["job"], str(job["claims"]), ", ".join(job["trainers"]) or "-",
                                   str(job["latest_step"] if job["latest_step"] is not None else "-"), heldout,
                                   job["model"] or "-", str(job["providers"]), age)))
    peers = Table(title="peers")
    for column in ("peer id", "role", "job", "state", "software"):
        peers.add_column(column)
    for peer in sorted(status["peers"], key=lambda p: (p["role"], p["job"])):
        peers.add_row(*map(escape, (peer["peer_id"][:20] + "…", peer["role"], peer["job"] or "-", peer["state"],
                                    peer["software"])))
    return [jobs, peers]
