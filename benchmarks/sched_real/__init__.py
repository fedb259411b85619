"""Parts of ``benchmarks/scheduler_real.py``: CPU plan, rates and streams (plan), load (load), one cluster's
worker process (worker), figures and targets (report)."""
