"""The webhook gateway: verifies `x-retell-signature` and publishes raw events to Kafka."""
