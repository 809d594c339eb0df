"""One logging set-up for every command: key=value lines on stderr, never secrets or transcripts."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        force=True,
    )
    # aiokafka and faust are chatty at INFO about every rebalance step.
    for noisy in ("aiokafka", "faust.transport", "mode", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
