"""The ground floor: what the gateway, the stream processors and the warehouse all share.

The event catalogue, settings, errors, topic set-up, logging and the webhook signature. Nothing
here imports a service or the assembly above it.
"""
