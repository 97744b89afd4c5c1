"""Looking inside a model: attention maps, next-token distributions, surprisal and embeddings.
Computations only; cli/views.py and cli/explorer.py draw them.

Imports core and generate.
"""
