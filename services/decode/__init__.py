"""The decode role handler: reservations, KV hand-off reception, decode and recompute."""
