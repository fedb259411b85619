"""The scheduler service: the core of ``libs.scheduler`` (registry, placement policies,
wait queue, role controller) on NATS, with its configuration, metrics and message checks.
"""
