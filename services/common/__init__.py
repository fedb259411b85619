"""Plumbing every FlowKV service shares: config, NATS connection, life cycle, logging."""
