"""tinygen: train, run and look inside compact GPT-style language models."""

__version__ = "0.1.0"

# The readers of other tools' files plug into core here, so that every entry point (the CLI, a
# script that imports tinygen.core) loads GGUF files and Hugging Face folders alike.
from tinygen import formats  # noqa: E402,F401
