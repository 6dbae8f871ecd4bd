"""The llama.cpp engine (llama-cpp-python): the GGUF base model with its own kernels (``backend``) and each
published adapter as a GGUF LoRA (``gguf_lora``, also used by training to convert a published version).

Must not know: users or SQL (it gets ``AdapterRef``s), the other engines.
"""
