"""vLLM as a node's engine: :mod:`engine` (the Engine protocol on vLLM's AsyncLLM) and :mod:`connector` (FlowKV's hand-off as a vLLM KV connector). Needs the ``vllm`` extra."""
