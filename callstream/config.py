"""Which `CALLSTREAM_*` variables callstream knows: every field of every settings class.

A variable no setting reads is most likely a typo (CALLSTREAM_API_KEY for CALLSTREAM_API_KEYS) or
a setting of another version; every command warns about it once at start-up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from dotenv import dotenv_values
from pydantic_settings import BaseSettings

from callstream.localkafka import LocalKafkaSettings
from gateway.settings import GatewaySettings
from kernel.settings import DOTENV, ENV_PREFIX, variable
from streams.settings import WorkerSettings
from warehouse.lake.settings import LakeSettings
from warehouse.personal_data import PersonalDataSettings
from warehouse.settings import SinkSettings

log = logging.getLogger(__name__)

SETTINGS: tuple[type[BaseSettings], ...] = (
    GatewaySettings,
    WorkerSettings,
    SinkSettings,
    LakeSettings,
    PersonalDataSettings,
    LocalKafkaSettings,
)


def known_variables() -> set[str]:
    """Every environment variable a callstream setting reads."""
    names = set()
    for cls in SETTINGS:
        for name, info in cls.model_fields.items():
            alias = info.validation_alias
            names.add(alias if isinstance(alias, str) else variable(name))
    return names


def unknown_variables(environ: Mapping[str, str], dotenv: Path) -> dict[str, str]:
    """`CALLSTREAM_*` names set in `environ` or the `dotenv` file that no setting reads -> where."""
    found = {name: "the environment" for name in environ if name.startswith(ENV_PREFIX)}
    try:
        from_file = dotenv_values(dotenv, encoding="utf-8") if dotenv.is_file() else {}
    except (OSError, UnicodeDecodeError):
        from_file = {}  # the command that reads its settings says what is wrong with the file
    found.update({name: str(dotenv) for name in from_file if name.startswith(ENV_PREFIX) and name not in found})
    known = known_variables()
    return {name: where for name, where in sorted(found.items()) if name not in known}


def warn_unknown_variables() -> None:
    for name, where in unknown_variables(os.environ, Path(DOTENV)).items():
        log.warning("%s (in %s) is not a callstream setting and has no effect; a typo?", name, where)
