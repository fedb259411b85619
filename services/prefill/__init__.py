"""The prefill role handler (also runs colocated requests)."""
