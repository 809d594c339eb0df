"""What the tests, the stress scripts and the soak share: the audit, the traffic producer and the
services started as real processes. Nothing here is a fixture; the conftest files wrap it."""
