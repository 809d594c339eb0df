"""Fetching Java programs from Maven Central into a cache folder, once (the local Kafka and S3 servers).

Maven resolves the artifact and its runtime dependencies and copies the jars into `<dest>/lib`; a
`.complete` file marks a finished copy, so an interrupted fetch is simply done again.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>callstream.local</groupId>
  <artifactId>{name}-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
{dependencies}
  </dependencies>
</project>
"""

DEPENDENCY = """    <dependency>
      <groupId>{group}</groupId><artifactId>{artifact}</artifactId><version>{version}</version>
    </dependency>"""


def pom(name: str, coordinates: list[str]) -> str:
    """A POM that depends on each `group:artifact:version`."""
    deps = []
    for c in coordinates:
        group, artifact, version = c.split(":")
        deps.append(DEPENDENCY.format(group=group, artifact=artifact, version=version))
    return POM.format(name=name, dependencies="\n".join(deps))


def ready(dest: Path) -> bool:
    return (dest / ".complete").exists()


def copy_dependencies(
    dest: Path, pom_text: str, what: str, fail: Callable[[str], Exception], say: Callable[[str], None]
) -> Path:
    """Copy the POM's runtime dependencies into `dest/lib` once; `fail(message)` makes the error to raise."""
    if ready(dest):
        return dest
    mvn = shutil.which("mvn")
    if mvn is None:
        raise fail(f"`mvn` (Apache Maven) was not found on PATH; it fetches {what} once")
    say(f"Fetching {what} from Maven Central into {dest} (once) ...")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pom.xml").write_text(pom_text)
    started = time.monotonic()
    cmd = [mvn, "-q", "-B", "-f", str(dest / "pom.xml"), "dependency:copy-dependencies"]
    cmd += [f"-DoutputDirectory={dest / 'lib'}", "-DincludeScope=runtime"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise fail(f"Maven could not fetch {what} (exit {proc.returncode}):\n  " + "\n  ".join(tail))
    (dest / ".complete").write_text(what)
    say(f"Fetched {what} in {time.monotonic() - started:.1f}s.")
    return dest
