"""callstream: voice-AI call webhooks, live in Kafka, Faust metrics and a DuckDB warehouse."""

__version__ = "0.1.0"
