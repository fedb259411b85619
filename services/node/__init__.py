"""The node process: hosts one engine and runs the handler(s) of its current role."""
