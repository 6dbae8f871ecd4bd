"""The transformers engine: the model in this process, continuously batched (``backend``, ``continuous``),
rows of different adapters in one pass (``lora_rows``), its peft adapter cache (``registry``).

Must not know: users or SQL (it gets ``AdapterRef``s), the other engines.
"""
