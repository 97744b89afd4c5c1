"""The model and what describes it: config, tokenizer, chat template, checkpoints, scoring.

The bottom layer: it imports nothing of generate, training, inspect or cli, and never prints.
"""
