"""The token embedding space: which tokens the model places near a word, and analogies by vector
arithmetic (king - man + woman).

Similarity is the cosine of the angle between rows of the token embedding matrix, the first
thing the model does with a token. A word that is several tokens is the mean of their vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError


@dataclass
class WordVector:
    word: str
    ids: list[int]
    vector: torch.Tensor  # (n_embd,)
    note: str | None = None  # said to the user when the word is several tokens


def table(model) -> torch.Tensor:
    """The token embedding matrix (vocab_size, n_embd) in float32: a GGUF's, read from the file once
    for a whole query."""
    return model.transformer.wte.weight.detach().float()


def word_vector(table: torch.Tensor, tokenizer: Tokenizer, word: str) -> WordVector:
    """A word's vector. Inside a sentence a word follows a space, and BPE vocabularies learn that
    form as a single token far more often than the bare word, so " word" is tried first."""
    if not word.strip():
        raise TinygenError("an empty word has no embedding")
    for form in (" " + word.strip(), word.strip()):
        ids = tokenizer.encode(form, special=False)
        if len(ids) == 1:
            return WordVector(word, ids, table[ids[0]])
    ids = tokenizer.encode(" " + word.strip(), special=False)
    parts = ", ".join(repr(tokenizer.label(i)) for i in ids)
    return WordVector(word, ids, table[ids].mean(0), f"{word!r} is {len(ids)} tokens ({parts}); using their mean")


@torch.no_grad()
def nearest(table: torch.Tensor, tokenizer: Tokenizer, vector: torch.Tensor, k: int,
            exclude=()) -> list[tuple[int, float]]:
    """The k tokens whose embeddings point most nearly the same way as vector: (id, cosine)."""
    sims = F.cosine_similarity(table, vector[None].float(), dim=-1)
    drop = list(set(exclude) | set(tokenizer.special_ids))
    if drop:
        sims[drop] = float("-inf")
    top = sims.topk(min(k, int((sims > float("-inf")).sum())))
    return list(zip(top.indices.tolist(), top.values.tolist()))


def analogy(table: torch.Tensor, tokenizer: Tokenizer, a: str, b: str,
            c: str) -> tuple[torch.Tensor, list[WordVector]]:
    """a - b + c, with the three word vectors (whose tokens a search should leave out: the nearest
    token to king - man + woman is usually king itself)."""
    words = [word_vector(table, tokenizer, w) for w in (a, b, c)]
    return words[0].vector - words[1].vector + words[2].vector, words


def neighbours(model, tokenizer: Tokenizer, words: list[str], k: int,
               as_analogy: bool = False) -> tuple[list[dict], list[str]]:
    """What `tinygen embed` reports: for each word (or for the one query A - B + C), its tokens and
    the k nearest others as {"query", "tokens", "nearest": [{"token", "text", "cosine"}]}; and the
    notes on words that are several tokens."""
    vectors = table(model)
    if as_analogy:
        vector, parts = analogy(vectors, tokenizer, *words)
        queries = [(f"{words[0]} - {words[1]} + {words[2]}", vector, parts)]
    else:
        queries = [(w.word, w.vector, [w]) for w in (word_vector(vectors, tokenizer, word) for word in words)]
    results, notes = [], []
    for name, vector, used in queries:
        notes += [w.note for w in used if w.note]
        found = nearest(vectors, tokenizer, vector, k, exclude=[i for w in used for i in w.ids])
        results.append({"query": name, "tokens": {w.word: [tokenizer.label(i) for i in w.ids] for w in used},
                        "nearest": [{"token": i, "text": tokenizer.label(i), "cosine": round(c, 6)} for i, c in found]})
    return results, notes
