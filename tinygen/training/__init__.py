"""Training: data and its token cache, chat data, the run's recipe and settings and what --resume
may change, the loop with its batches, events, optimizers, state and metrics, stopping (signals,
and ranks that stop together), and the multi-process set-up.

Imports core, and generate for the samples it draws at each evaluation.
"""
