"""docker-compose.yml read as Compose reads it, and its services turned into local processes.

`${VAR:-default}`, `${VAR-default}`, `${VAR}` and `$$` are resolved against a given shell
environment, YAML anchors and merge keys by PyYAML. A service becomes a local process as Docker
would run it on a machine of its own: the image's ENTRYPOINT with the service's `command` and
`environment`, every compose host name on loopback, each published container port on a free port
of this machine (in the command and in the environment), and each volume a folder of the service's
own working folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from callstream.localkafka import free_port
from tests.support.paths import REPO

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(text: str, shell: Mapping[str, str]) -> str:
    """`text` with Compose's variable forms replaced from `shell`; `${VAR:?msg}` unset raises."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        value = shell.get(name)
        unset = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in ("-", ":-"):
            return arg if unset else str(value)
        if op in ("?", ":?") and unset:
            raise ValueError(f"${{{name}}} is required: {arg}")
        return value or ""

    return _VAR.sub(one, text)


def _resolve(node: Any, shell: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, shell)
    if isinstance(node, list):
        return [_resolve(v, shell) for v in node]
    if isinstance(node, dict):
        return {k: _resolve(v, shell) for k, v in node.items()}
    return node


def load(shell: Mapping[str, str], path: Path = COMPOSE) -> dict[str, Any]:
    """The compose file with anchors, merge keys and variables resolved."""
    return _resolve(yaml.safe_load(path.read_text()), shell)  # type: ignore[no-any-return]


def entrypoint(path: Path = DOCKERFILE) -> list[str]:
    """The image's ENTRYPOINT (exec form)."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("ENTRYPOINT")]
    assert len(lines) == 1, f"{path} has {len(lines)} ENTRYPOINT lines"
    return list(json.loads(lines[0].removeprefix("ENTRYPOINT")))


@dataclass
class Service:
    """One compose service as a local process: its arguments, environment and working folder."""

    name: str
    args: list[str]
    env: dict[str, str]
    folder: Path
    ports: dict[int, int] = field(default_factory=dict)  # container port -> this machine's port

    def url(self, container_port: int) -> str:
        return f"http://127.0.0.1:{self.ports[container_port]}"


def _container_port(spec: str) -> int:
    return int(str(spec).split(":")[-1].split("/")[0])


@dataclass
class Deployment:
    """Every service of a compose file placed on this machine; `brokers` maps a host to host:port."""

    spec: dict[str, Any]
    root: Path
    brokers: dict[str, str]
    ports: dict[tuple[str, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, svc in self.spec["services"].items():
            for p in svc.get("ports", []):
                self.ports[(name, _container_port(p))] = free_port()

    def _address(self, m: re.Match[str]) -> str:
        host, port = m.group(1), int(m.group(2))
        if host in self.brokers:
            return self.brokers[host]
        return f"127.0.0.1:{self.ports.get((host, port), port)}"

    def _localize(self, value: str, volumes: Mapping[str, Path]) -> str:
        hosts = "|".join(re.escape(h) for h in sorted(self.spec["services"], key=len, reverse=True))
        value = re.sub(rf"\b({hosts}):(\d+)\b", self._address, value)
        for target, folder in volumes.items():
            if value == target or value.startswith(target.rstrip("/") + "/"):
                value = str(folder) + value[len(target.rstrip("/")) :]
        return value

    def service(self, name: str, run_as: Callable[[list[str]], list[str]]) -> Service:
        """The local process of service `name`; `run_as` maps the image's command line to a local one."""
        svc = self.spec["services"][name]
        folder = self.root / name
        volumes = {}
        for spec in svc.get("volumes", []):
            source, target = str(spec).split(":")[:2]
            volumes[target] = folder / "volumes" / source.strip("./").replace("/", "_")
            volumes[target].mkdir(parents=True, exist_ok=True)
        own = {cport: port for (owner, cport), port in self.ports.items() if owner == name}

        def local(value: object) -> str:
            text = str(value)
            if text == "0.0.0.0":
                text = "127.0.0.1"  # this service's own interface is loopback here
            elif text.isdigit() and int(text) in own:
                text = str(own[int(text)])
            return self._localize(text, volumes)

        env = {k: local(v) for k, v in (svc.get("environment") or {}).items()}
        args = [local(arg) for arg in svc.get("command", [])]
        folder.mkdir(parents=True, exist_ok=True)
        return Service(name, run_as([*entrypoint(), *args]), env, folder, own)
