"""A throwaway PostgreSQL server from Debian's packages, for the lake's tests and benchmark (`make test`
installs them), started the way `callstream kafka start` starts a broker.

initdb runs in a temporary folder of its own (owned by the `postgres` user when the tests run as root,
since PostgreSQL refuses to run as root); pg_ctl starts it on a free loopback port, with its unix
socket in that folder too. Trust authentication: it listens on 127.0.0.1 only, for this test run.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from callstream.localkafka import free_port
from kernel.errors import CallstreamError


class PostgresError(CallstreamError):
    """The local PostgreSQL server could not be found, set up or started."""


def pg_bin() -> Path | None:
    """The folder of Debian's newest PostgreSQL server programs (None: not installed)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Postgres:
    folder: Path
    port: int
    bin: Path
    user: str | None  # run as this user (when we are root)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=self.folder)
        if proc.returncode != 0:
            raise PostgresError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")

    def start(self) -> None:
        data = self.folder / "data"
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.folder} -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(data), "-l", str(self.folder / "postgres.log"), "-o", opts, "-w", "-t", "60", "start"
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")

    def log(self) -> str:
        p = self.folder / "postgres.log"
        return p.read_text(errors="replace") if p.exists() else ""


def start_postgres() -> Postgres:
    """A fresh server in a new temporary folder; the caller stops it and removes the folder."""
    where = pg_bin()
    if where is None:
        raise PostgresError("PostgreSQL is not installed: `apt-get install -y postgresql` (make test does it)")
    folder = Path(tempfile.mkdtemp(prefix="callstream-pg-"))
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        pw = pwd.getpwnam(user)
        os.chown(folder, pw.pw_uid, pw.pw_gid)
    pg = Postgres(folder=folder, port=free_port(), bin=where, user=user)
    pg.start()
    return pg
