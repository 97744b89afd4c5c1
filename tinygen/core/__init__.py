"""The model and what describes it: config, tokenizer, chat template, tinygen's own checkpoint,
scoring, and the device a command runs on.

The bottom layer: it imports nothing of formats, generate, training, inspect or cli, and never
prints. Other tools' files reach it through formats/, which registers its readers here.
"""
