"""Parts of ``benchmarks/scheduler_real/run.py``: CPU plan, rates and streams (plan), load (load), one cluster's
worker process (worker), figures and targets (report)."""
