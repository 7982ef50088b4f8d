"""The VMM: configuration, wiring (builder), vCPU threads and the machine life cycle."""
