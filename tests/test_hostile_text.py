"""Strings that come from the network (a peer's `software` field, a rejection reason quoting a
stranger's header or p2pd's own error text) are printed as text, never read as rich markup: a `[/]`
in them must neither crash the command nor restyle what it prints."""

import io

from rich.console import Console

from node.cli.generate_commands import print_rejections
from node.swarm.status import status_tables

HOSTILE = ["[/]", "[/ddm-swarm/blob/1]", "[bold red]owned[/bold red]", "[link=file:///etc/passwd]x[/link]", "[[/]]"]


def _render(*renderables) -> str:
    console = Console(file=io.StringIO(), width=400, color_system=None)
    for renderable in renderables:
        console.print(renderable)
    return console.file.getvalue()


def test_rejection_reasons_with_markup_are_printed_verbatim():
    out = io.StringIO()
    print_rejections(Console(file=out, width=400, color_system=None),
                     [("ab" * 32, f"could not fetch it: {text}") for text in HOSTILE])
    for text in HOSTILE:
        assert text in out.getvalue()


def test_status_tables_print_peer_fields_with_markup_verbatim():
    peers = [{"peer_id": "12D3Koo" + text * 4, "role": text, "job": text, "state": text, "software": text}
             for text in HOSTILE]
    status = {"swarm": HOSTILE[0], "swarm_id": "0" * 64, "protocol_version": 1, "coverage": "0/1", "online_peers": 0,
              "jobs": [{"job": "expert/0", "claims": 1, "trainers": HOSTILE, "latest_step": 5, "heldout": 0.5,
                        "model": HOSTILE[1], "providers": 1, "age_s": 3.0}], "peers": peers, "warnings": []}
    printed = _render(*status_tables(status))
    for text in HOSTILE:
        assert text in printed
