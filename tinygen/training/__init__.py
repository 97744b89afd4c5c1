"""Training: data and its token cache, chat data, the run recipe and what --resume may change, the
loop, its state and metrics, stopping (signals, and ranks that stop together), and the
multi-process set-up.

Imports core, and generate for the samples it draws at each evaluation.
"""
