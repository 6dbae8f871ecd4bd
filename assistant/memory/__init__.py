"""Personal memory: what a user told Attune before, found again by meaning. The use cases (``service``), the
rules of what becomes memory and what comes out (``policy``), the text forms shared with training (``text``),
the per-user FAISS indexes (``cache`` over ``index``) and the embedder seam (``embedder``).

Must not know: the model, the engines, the chat turn, the UI or training. It reads and writes only through
``storage``.
"""
