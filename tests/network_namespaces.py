"""A small LAN of Linux network namespaces for multi-host tests: one namespace per host, each with
its own interface `eth0` and address, joined by veth pairs to a bridge that lives in a namespace of
its own (so nothing is added to the machine's own network, and deleting the namespaces removes
every interface). Needs root and `ip netns`; `unavailable_reason()` says why not otherwise.

`HomeNetwork` adds a home behind a NAT router to such a LAN: the router masquerades the home's
outgoing connections and lets nothing in that the home did not start (`nat_unavailable_reason()`
says why it cannot be built, e.g. no `iptables`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Dict, List, Optional, Sequence


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def unavailable_reason() -> Optional[str]:
    """None if network namespaces can be made here, else why not (for pytest.skip)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces (`ip netns add`) needs root"
    probe = f"ddm{os.getpid()}-probe"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    bridge = _ip("-n", probe, "link", "add", "probe-br", "type", "bridge")
    _ip("netns", "del", probe)
    if bridge.returncode != 0:
        return f"no bridge interfaces in network namespaces: {bridge.stderr.strip()}"
    return None


class NamespaceLan:
    """Hosts `names` on 10.77.0.0/24 (addresses .1, .2, … in order), each in namespace
    `ddm<pid>-<name>`. Use as a context manager: the namespaces are deleted on exit, even after a
    failure (kill the processes started in them first: a namespace lives while a process uses it)."""

    SUBNET = "10.77.0"

    def __init__(self, names: Sequence[str], tag: str = ""):
        self.tag = f"ddm{os.getpid()}{tag}"
        self.switch = f"{self.tag}-switch"
        self.addresses: Dict[str, str] = {name: f"{self.SUBNET}.{i}" for i, name in enumerate(names, start=1)}
        self.created: List[str] = []

    def namespace(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def prefix(self, name: str) -> List[str]:
        """Command prefix that runs a program on host `name`."""
        return ["ip", "netns", "exec", self.namespace(name)]

    def __enter__(self) -> "NamespaceLan":
        try:
            self._add_namespace(self.switch)
            self._run("-n", self.switch, "link", "add", "br0", "type", "bridge")
            self._run("-n", self.switch, "link", "set", "br0", "up")
            for i, (name, address) in enumerate(self.addresses.items(), start=1):
                host = self.namespace(name)
                self._add_namespace(host)
                self._run("-n", self.switch, "link", "add", f"port{i}", "type", "veth", "peer", "name", "eth0",
                          "netns", host)
                self._run("-n", self.switch, "link", "set", f"port{i}", "master", "br0", "up")
                self._run("-n", host, "addr", "add", f"{address}/24", "dev", "eth0")
                self._run("-n", host, "link", "set", "eth0", "up")
                self._run("-n", host, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for namespace in reversed(self.created):
            _ip("netns", "del", namespace)
        self.created.clear()

    def received_bytes(self, name: str) -> int:
        """Bytes host `name` has received on its eth0 so far."""
        out = self._run("-n", self.namespace(name), "-s", "-j", "link", "show", "eth0").stdout
        return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])

    def add_port(self, name: str, address: str) -> str:
        """One more host `name` on the LAN at `address`; returns its namespace (deleted on exit)."""
        host = self.namespace(name)
        port = f"port{len(self.created)}"
        self._add_namespace(host)
        self._run("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host)
        self._run("-n", self.switch, "link", "set", port, "master", "br0", "up")
        self._run("-n", host, "addr", "add", f"{address}/24", "dev", "eth0")
        self._run("-n", host, "link", "set", "eth0", "up")
        self._run("-n", host, "link", "set", "lo", "up")
        return host

    def _add_namespace(self, namespace: str) -> None:
        self._run("netns", "add", namespace)
        self.created.append(namespace)

    @staticmethod
    def _run(*args: str) -> subprocess.CompletedProcess:
        done = _ip(*args)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
        return done


def nat_unavailable_reason() -> Optional[str]:
    """None if a NAT router can be built in a namespace here, else why not (for pytest.skip)."""
    reason = unavailable_reason()
    if reason:
        return reason
    if shutil.which("iptables") is None:
        return "`iptables` is not installed (apt-get install -y iptables)"
    probe = f"ddm{os.getpid()}-natprobe"
    _ip("netns", "add", probe)
    try:
        done = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-A", "POSTROUTING", "-j",
                               "MASQUERADE"], capture_output=True, text=True, timeout=30)
    finally:
        _ip("netns", "del", probe)
    if done.returncode != 0:
        return f"iptables NAT is not permitted in a network namespace here: {done.stderr.strip()[:200]}"
    return None


class HomeNetwork:
    """A home `name` at 10.77.1.2 behind a router whose WAN side is `wan_address` on `lan`.

    The router masquerades (SNAT) whatever the home sends out, and its FORWARD chain drops every
    packet from the WAN that does not belong to a connection the home opened: like a home router
    with no port forwarded. The LAN's other hosts have no route to 10.77.1.0/24 at all."""

    HOME, GATEWAY = "10.77.1.2", "10.77.1.1"

    def __init__(self, lan: NamespaceLan, name: str = "home", wan_address: str = "10.77.0.254"):
        self.lan, self.name, self.wan_address = lan, name, wan_address
        self.router = lan.add_port(f"{name}-router", wan_address)
        self.home = lan.namespace(name)
        lan._add_namespace(self.home)
        run = NamespaceLan._run
        run("-n", self.router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", self.home)
        run("-n", self.router, "addr", "add", f"{self.GATEWAY}/24", "dev", "lan0")
        run("-n", self.router, "link", "set", "lan0", "up")
        run("-n", self.home, "addr", "add", f"{self.HOME}/24", "dev", "eth0")
        run("-n", self.home, "link", "set", "eth0", "up")
        run("-n", self.home, "link", "set", "lo", "up")
        run("-n", self.home, "route", "add", "default", "via", self.GATEWAY)
        for command in (["sysctl", "-qw", "net.ipv4.ip_forward=1"],
                        ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"],
                        ["iptables", "-P", "FORWARD", "DROP"],
                        ["iptables", "-A", "FORWARD", "-i", "lan0", "-o", "eth0", "-j", "ACCEPT"],
                        ["iptables", "-A", "FORWARD", "-i", "eth0", "-o", "lan0", "-m", "conntrack", "--ctstate",
                         "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                        ["iptables", "-P", "INPUT", "DROP"],  # nothing on the router itself either
                        ["iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j",
                         "ACCEPT"]):
            done = subprocess.run(["ip", "netns", "exec", self.router, *command], capture_output=True, text=True,
                                  timeout=30)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} in the router failed: {done.stderr.strip()}")

    def refuse_direct(self, address: str) -> None:
        """Let nothing from the home reach `address` directly, as a symmetric NAT or a firewall would
        make hole punching towards it fail: that host then reaches the home through a relay only."""
        done = subprocess.run(["ip", "netns", "exec", self.router, "iptables", "-I", "FORWARD", "1", "-i", "lan0",
                               "-d", address, "-j", "DROP"], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"refusing {address} in the router failed: {done.stderr.strip()}")

    def prefix(self) -> List[str]:
        """Command prefix that runs a program in the home, behind the NAT."""
        return ["ip", "netns", "exec", self.home]
