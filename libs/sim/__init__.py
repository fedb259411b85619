"""Discrete-event simulation of a FlowKV cluster that runs the real scheduler core.

The registry, placement policies and role controller of ``services.scheduler`` are
driven here on simulated time (a ``ManualClock``); only the nodes are modelled, with
costs from :mod:`libs.sim.calibration`.
"""
