"""What the node process and both role handlers share: the node's config, the context
handed to the handlers, streaming to the gateway, checks on incoming work, the node's
metrics and its per-peer KV link figures.

It sits below the handlers (``services.prefill``, ``services.decode``) and the node
process (``services.node``) and imports none of them.
"""
