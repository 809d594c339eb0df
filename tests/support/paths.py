"""Where the repository is, for tests that read its files or share its Kafka jar cache."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KAFKA_JARS = REPO / ".kafka" / "jars"
