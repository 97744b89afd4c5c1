"""tinygen: train, run and look inside compact GPT-style language models."""

__version__ = "0.1.0"
