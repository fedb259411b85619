"""Discrete-event simulation of a FlowKV cluster that runs the real scheduler core.

The registry, placement policies, wait queue and role controller of ``libs.scheduler``
(the same code the scheduler service runs) are driven here on simulated time (a
``ManualClock``); only the nodes are modelled, with costs from :mod:`libs.sim.calibration`.
"""
