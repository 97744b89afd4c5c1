"""Training: data and its token cache, chat data, the run recipe, the loop, its state and metrics,
and the multi-process set-up.

Imports core, and generate for the samples it draws at each evaluation.
"""
