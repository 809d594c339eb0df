"""Hosts for the cluster tests: each a Linux network namespace with its own address on one bridge.

`Network.make()` builds a bridge in the root namespace (the test process reaches every host through
its address) and `add(name)` a namespace joined to it by a veth pair. Every name carries a tag of
this run, and the subnet is one no interface uses yet, so that runs side by side never collide;
`close()` removes every namespace, veth, bridge and rule (the rules live inside the namespaces).
A process runs on a host through `host.wrapper` (`ip netns exec <namespace>`).

The faults are real ones: `partition` drops every packet of the host's link both ways (iptables in
its namespace), `impair` holds each packet it sends for a delay (an NFQUEUE that
`tests.support.nfdelay` releases; this kernel has no `tc netem`) and drops a share of them, and
`lose` pulls the cable (the veth goes) and then kills everything on the host and the namespace.

Where namespaces cannot be made (not root, no `ip`), `Network.make()` returns a loopback network:
every host is 127.0.0.1, `lose` kills the host's processes, and `partition` and `impair` skip the
test with the reason.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from callstream.procs import Process, spawn
from tests.support.paths import REPO


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def namespaces_unavailable() -> str | None:
    """Why this machine cannot make network namespaces for the tests, or None when it can
    (TESTS_LOOPBACK=1 asks for loopback anyway, to try that path)."""
    if os.environ.get("TESTS_LOOPBACK") == "1":
        return "TESTS_LOOPBACK=1 asks for loopback"
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian: apt-get install iproute2 iptables)"
    probe = f"csprobe{uuid.uuid4().hex[:6]}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    try:
        _run("ip", "netns", "exec", probe, "iptables", "-A", "OUTPUT", "-j", "NFQUEUE", "--queue-bypass")
    except RuntimeError as exc:
        return f"iptables NFQUEUE is not available in a namespace: {exc}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.128.0.0/9 that no interface of the root namespace is on."""
    used = []
    for entry in json.loads(_run("ip", "-j", "addr").stdout or "[]"):
        for a in entry.get("addr_info", []):
            if a.get("family") == "inet":
                used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    pool = ipaddress.ip_network("10.128.0.0/9")
    for _ in range(100):
        index = int.from_bytes(os.urandom(2), "big") % 2**15
        net = ipaddress.IPv4Network(f"{pool.network_address + index * 256}/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free /24 in 10.128.0.0/9 for the test network")


@dataclass
class NetHost:
    """One host: a namespace (or loopback), its address, and the processes started on it."""

    network: Network
    name: str
    address: str
    namespace: str | None = None
    veth: str | None = None
    processes: list[Process] = field(default_factory=list)
    delayer: subprocess.Popen[bytes] | None = None
    lost: bool = False

    @property
    def wrapper(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespace) if self.namespace else ()

    def spawn(
        self, name: str, cmd: Sequence[str], log: Path, env: dict[str, str], cwd: Path, url: str | None = None
    ) -> Process:
        """Start `cmd` on this host; `lose` kills it with the host."""
        proc = spawn(name, [*self.wrapper, *cmd], log, env, cwd=cwd, url=url)
        self.processes.append(proc)
        return proc

    def _in(self, *cmd: str) -> None:
        assert self.namespace is not None
        _run("ip", "netns", "exec", self.namespace, *cmd)

    def _real(self, fault: str) -> None:
        if self.namespace is None:
            pytest.skip(f"{fault} needs hosts of their own: {self.network.why_loopback}")

    def partition(self) -> None:
        """Drop every packet in and out of the host's link: nobody reaches it, it reaches nobody."""
        self._real("a network partition")
        self._in("iptables", "-I", "INPUT", "-i", "eth0", "-j", "DROP")
        self._in("iptables", "-I", "OUTPUT", "-o", "eth0", "-j", "DROP")

    def heal(self) -> None:
        """Remove the partition's and the impairment's rules and the delaying process."""
        if self.namespace is None or self.lost:
            return
        if self.delayer is not None:
            self.delayer.terminate()
            self.delayer.wait(timeout=10)
            self.delayer = None
        for chain in ("INPUT", "OUTPUT"):
            self._in("iptables", "-F", chain)

    def impair(self, delay_ms: float, loss: float) -> None:
        """Hold every packet the host sends for `delay_ms` and drop a share `loss` of them (tc netem's
        `delay` and `loss` on the host's interface)."""
        self._real("added latency and loss")
        # The queue belongs to the namespace: one number serves every host.
        self.delayer = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "tests.support.nfdelay", "--queue", "1", "--delay-ms", str(delay_ms)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
        )
        assert self.delayer.stdout is not None
        self.delayer.stdout.readline()  # bound: packets may go to the queue now
        drop = ("-m", "statistic", "--mode", "random", "--probability", str(loss), "-j", "DROP")
        self._in("iptables", "-A", "OUTPUT", "-o", "eth0", *drop)
        self._in("iptables", "-A", "OUTPUT", "-o", "eth0", "-j", "NFQUEUE", "--queue-num", "1", "--queue-bypass")

    def lose(self) -> None:
        """The host is gone: its link first (peers get no FIN or RST, as from a dead machine), then
        every process on it, then the namespace."""
        self.lost = True
        if self.namespace is None:
            for proc in self.processes:
                with contextlib.suppress(ProcessLookupError):
                    proc.proc.send_signal(signal.SIGKILL)
            return
        if self.veth is not None:
            _run("ip", "link", "del", self.veth, check=False)
        self._kill_all()
        _run("ip", "netns", "del", self.namespace, check=False)

    def _kill_all(self) -> None:
        assert self.namespace is not None
        for _ in range(20):
            pids = _run("ip", "netns", "pids", self.namespace, check=False).stdout.split()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.1)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.proc.wait(timeout=5)


@dataclass
class Network:
    """A bridge and its hosts, named with this run's tag; or loopback when namespaces are unavailable."""

    tag: str
    why_loopback: str | None = None
    bridge: str | None = None
    subnet: ipaddress.IPv4Network | None = None
    hosts: dict[str, NetHost] = field(default_factory=dict)
    made: int = 0  # hosts made so far: each gets the next address and veth name

    @classmethod
    def make(cls) -> Network:
        tag = uuid.uuid4().hex[:6]
        why = namespaces_unavailable()
        if why is not None:
            return cls(tag, why_loopback=why)
        bridge = f"csbr{tag}"
        net = cls(tag, bridge=bridge, subnet=_free_subnet())
        try:
            _run("ip", "link", "add", bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{net.gateway_address}/24", "dev", bridge)
            _run("ip", "link", "set", bridge, "up")
        except RuntimeError:
            net.close()
            raise
        return net

    @property
    def real(self) -> bool:
        return self.bridge is not None

    @property
    def gateway_address(self) -> str:
        """This (the test's) side of the bridge: where hosts reach servers the test runs."""
        return str(self.subnet.network_address + 1) if self.subnet is not None else "127.0.0.1"

    def add(self, name: str) -> NetHost:
        """A new host on the bridge (or on loopback)."""
        if self.subnet is None or self.bridge is None:
            host = NetHost(self, name, "127.0.0.1")
            self.hosts[name] = host
            return host
        index = self.made
        self.made += 1
        namespace, veth = f"cs{self.tag}-{name}", f"cs{self.tag}v{index}"
        address = str(self.subnet.network_address + 10 + index)
        host = NetHost(self, name, address, namespace, veth)
        self.hosts[name] = host  # before anything is made: close() removes what was
        _run("ip", "netns", "add", namespace)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _run("ip", "link", "set", veth, "master", self.bridge, "up")
        host._in("ip", "addr", "add", f"{address}/24", "dev", "eth0")
        host._in("ip", "link", "set", "eth0", "up")
        host._in("ip", "link", "set", "lo", "up")
        return host

    def remove(self, host: NetHost) -> None:
        """Take `host` away: its rules, its processes, its namespace and link."""
        if host.namespace is not None:
            if not host.lost:
                host.heal()
            host.lose()
        self.hosts.pop(host.name, None)

    def close(self) -> None:
        """Remove every host (killing what runs on it), then the bridge."""
        for host in list(self.hosts.values()):
            self.remove(host)
        if self.bridge is not None:
            _run("ip", "link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this run that still exist (none after `close`)."""
        names = _run("ip", "netns", "list", check=False).stdout.split()
        links = [e.get("ifname", "") for e in json.loads(_run("ip", "-j", "link", check=False).stdout or "[]")]
        return [n for n in names + links if n.startswith((f"cs{self.tag}", f"csbr{self.tag}"))]
