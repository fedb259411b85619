"""FlowKV's KV hand-off: block-major layout, segment allocation, alignment, transports."""
