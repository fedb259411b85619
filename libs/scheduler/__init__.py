"""The scheduler's core: node registry, cost model, placement policies, wait queue, demand, role controller.

It knows nothing of NATS and reads time only through an injected
:class:`~libs.scheduler.clock.Clock`, so the same code runs in the scheduler service
(``services.scheduler``, on the system clock) and in the simulator (``libs.sim``, on a
``ManualClock``). It imports only ``libs.protocol``.
"""
