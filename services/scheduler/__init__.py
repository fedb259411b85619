"""The scheduler: node registry from load reports, placement policies, role controller.

The pure core (``registry``, ``placement``, ``policies``, ``roles``) knows nothing of NATS
and reads time only through an injected :class:`~services.scheduler.clock.Clock`, so the
same code runs in the service and in the simulator (``libs.sim``).
"""
