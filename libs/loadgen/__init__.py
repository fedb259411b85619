"""Load generation for ``flowkv bench``: workloads, arrivals, the streaming client, metrics, reports."""
