"""Generation: sampling, the KV-cache engine on token ids, text in and out, chat sessions, and the
inference-time fast paths (compiled decode step, int8 layers, split CPU matrix-vector products).

Imports only core.
"""
