"""Attention over the device KV pool: the backend (store by slot + one ragged call per layer) and
question retrieval into reserved slots of the same pool."""
