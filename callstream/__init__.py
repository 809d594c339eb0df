"""callstream: voice-AI call webhooks, live in Kafka, Faust metrics and a DuckDB warehouse."""

from importlib.metadata import version

__version__ = version("callstream")  # written once, in pyproject.toml
