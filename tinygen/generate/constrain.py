"""Structured output: a JSON schema, a regular expression, a list of choices or a grammar, enforced
token by token while the model decodes.

llguidance does the matching. It reads the constraint once, and at each step it marks which tokens
of the vocabulary can continue the text so that it still fits. The engine sets every other logit
to -inf before any sampling filter, so temperature, top-k, top-p and min-p choose among what the
constraint allows, and greedy decoding takes the best-scoring allowed token. The token drawn then
advances the row's matcher. A row's end-of-text tokens are allowed only once the text is
complete, and a row ends when the constraint allows nothing more. A row that runs out of tokens
first is left incomplete, and its caller says so.

Special tokens are never allowed inside the text: llguidance sees them marked as such. The one
llguidance tokenizer per vocabulary is made on first use, from the same token bytes that tinygen
decodes with, so every vocabulary tinygen runs (byte-level BPE, SentencePiece) works the same way.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
import torch

from tinygen.errors import TinygenError, one_line

INSTALL = "pip install 'tinygen[structured]'"
KINDS = ("json_schema", "regex", "choice", "grammar")
# The JSON a script reads: one line, with the spaces json.dumps puts after , and :. A model may not
# pad it with whitespace of its own, which a small model at a high temperature does without end.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = '{"type": "object"}'


@dataclass(frozen=True)
class Constraint:
    """What a row's text must be. source is the schema as JSON text, the regex, the choices as a JSON
    list, or the grammar text (Lark, or GBNF as llama.cpp writes it)."""

    kind: str
    source: str

    @classmethod
    def json_schema(cls, schema: str | dict) -> Constraint:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise TinygenError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise TinygenError("the JSON schema must be a JSON object, such as "
                               '{"type": "object", "properties": {...}}')
        return cls("json_schema", json.dumps(schema, ensure_ascii=False))

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        if not options or not all(isinstance(o, str) and o for o in options):
            raise TinygenError("a choice needs one or more non-empty strings")
        return cls("choice", json.dumps(list(dict.fromkeys(options)), ensure_ascii=False))

    @classmethod
    def of(cls, kind: str, value) -> Constraint:
        """The constraint of one of KINDS from its value as a flag or a request gives it: a schema (an
        object, or its JSON text), a list of choices, or the regex's or grammar's text."""
        if kind == "json_schema":
            return cls.json_schema(value)
        if kind == "choice":
            if not isinstance(value, (list, tuple)):
                raise TinygenError('"choice" must be a list of strings')
            return cls.choice(value)
        if kind not in KINDS:
            raise ValueError(f"no constraint kind {kind!r}")
        if not isinstance(value, str) or not value:
            raise TinygenError(f'"{kind}" must be a non-empty string')
        return cls(kind, value)

    @property
    def label(self) -> str:
        return {"json_schema": "JSON", "regex": "regex", "choice": "choice", "grammar": "grammar"}[self.kind]

    def grammar(self) -> str:
        """The constraint as llguidance's grammar text; a TinygenError when it cannot be read."""
        llguidance = require()
        make = llguidance.LLMatcher
        if self.kind == "json_schema":
            return make.grammar_from_json_schema(self.source, defaults=JSON_STYLE)
        if self.kind == "regex":
            return make.grammar_from_regex(self.source)
        if self.kind == "choice":
            return llguidance.grammar_from("choice", self.source)
        converter = llguidance.gbnf_to_lark
        try:
            return make.grammar_from_lark(converter.any_to_lark(self.source))
        except converter.GbnfToLarkError as e:
            raise TinygenError(f"invalid grammar: it is not Lark, and as GBNF: {one_line(e)}") from None


def require():
    try:
        import llguidance
        import llguidance.gbnf_to_lark
    except ImportError:
        raise TinygenError(f"structured output needs llguidance: {INSTALL}") from None
    return llguidance


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: every token's bytes (a special one marked with 0xFF,
    llguidance's sign for a token no text may contain) and a way to encode text."""

    def __init__(self, tokenizer):
        special = tokenizer.special_ids
        # llguidance encodes the bytes a constraint forces (the "{" that opens a JSON object) and lets
        # only the first id of that come next, so the ids must spell exactly those bytes: SentencePiece's
        # space before a text's first piece, or NFC (Qwen2), would write others, which it then refuses.
        exact = {k: v for k, v in (("add_space_prefix", False), ("normalization", None)) if getattr(tokenizer, k, v) != v}
        if exact:
            tokenizer = copy.copy(tokenizer)
            vars(tokenizer).update(exact)
        self.tokenizer = tokenizer
        self.tokens = [b"\xff" + tokenizer.label(i).encode() if i in special else tokenizer.token_bytes(i)
                       for i in range(tokenizer.n_vocab)]
        self.special_token_ids = sorted(special)
        stops = tokenizer.stop_ids or tuple(special)
        self.eos_token_id = stops[0] if stops else None
        self.bos_token_id = tokenizer.bos_id

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, special=False)


class Guide:
    """The constraints of one vocabulary: each checked once, and a fresh matcher for every row."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._grammars: dict[Constraint, str] = {}

    @cached_property
    def lltokenizer(self):
        llguidance = require()
        vocabulary = _Vocabulary(self.tokenizer)
        if vocabulary.eos_token_id is None:
            raise TinygenError("structured output needs a vocabulary with an end-of-text token")
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocabulary))

    @cached_property
    def _bytes(self):
        """A vocabulary of the 256 bytes alone: what can write any text, to tell a constraint that
        matches nothing from one this vocabulary cannot write."""
        llguidance = require()

        class Bytes:
            eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
            tokens = [bytes([b]) for b in range(256)] + [b"\xff<eos>"]

            def __call__(self, text: str) -> list[int]:
                return list(text.encode())

        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Bytes()))

    def check(self, constraint: Constraint) -> str:
        """The constraint's grammar, once it is known to be usable here; else one clear TinygenError."""
        if constraint in self._grammars:
            return self._grammars[constraint]
        try:
            grammar = constraint.grammar()
        except ValueError as e:  # llguidance's word for input it cannot read
            raise TinygenError(f"invalid {constraint.label} constraint: {one_line(e)}") from None
        matcher = self._start(self.lltokenizer, grammar)
        if matcher.is_error():
            if self._start(self._bytes, grammar).is_error():
                raise TinygenError(f"invalid {constraint.label} constraint: {_reason(matcher)}")
            raise TinygenError(f"this model's vocabulary cannot write any text the {constraint.label} constraint "
                               "allows (it lacks bytes the text needs)")
        self._grammars[constraint] = grammar
        return grammar

    def _start(self, lltokenizer, grammar: str):
        matcher = require().LLMatcher(lltokenizer, grammar, log_level=0)
        if not matcher.is_error():
            matcher.compute_bitmask()  # the first step finds a constraint that no text can satisfy
        return matcher

    def matcher(self, constraint: Constraint) -> Matcher:
        llmatcher = require().LLMatcher(self.lltokenizer, self.check(constraint), log_level=0)
        return Matcher(llmatcher, self.tokenizer.n_vocab, self.lltokenizer.eos_tokens)


class Matcher:
    """One row's place in its constraint: what the engine asks of it."""

    def __init__(self, llmatcher, n_tokens: int, ends: Sequence[int] = ()):
        self.llmatcher = llmatcher
        self.words = (n_tokens + 31) // 32  # a mask's int32 words, one bit per token
        self.ends = tuple(ends)  # llguidance's end-of-text ids, which it allows once the text is complete

    def advance(self, token: int) -> None:
        if not self.llmatcher.consume_token(token):  # the mask allowed it, so this is llguidance's fault
            raise RuntimeError(f"the constraint refused token {token}: {self.llmatcher.get_error()}")

    @property
    def stopped(self) -> bool:
        """The text is complete and nothing may follow it."""
        return self.llmatcher.is_stopped()

    @property
    def complete(self) -> bool:
        """The text so far satisfies the constraint."""
        return self.llmatcher.is_accepting()


def _reason(matcher) -> str:
    """llguidance's error, as one line that speaks of the user's text rather than its own grammar."""
    error = matcher.get_error()
    if error.startswith("NoExtension"):
        return "no text matches it"
    lines = [line.strip() for line in error.split("\n")]
    detail = next((line[len("error: "):] for line in lines if line.startswith("error: ")), None)
    if detail:  # a regex's own parser, whose position is in llguidance's wrapping of it
        return detail
    return re.sub(r"^(?:at )?(\d+)\((\d+)\): ", r"line \1, column \2: ", lines[0])


@cache
def _executor():
    """llguidance's pool of threads, which fill a batch's masks without the GIL."""
    return require().LLExecutor()


def masked(logits: torch.Tensor, matchers: Sequence[Matcher | None],
           stop_ids: Collection[int]) -> tuple[torch.Tensor, list[bool]]:
    """The logits (B, V) with -inf for every token a row's matcher (None: no constraint) does not
    allow next, and which rows are stuck: allowed nothing at all, so they must end here. A row's
    stop ids are allowed once its text is complete."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    words = matchers[rows[0]].words
    bits = np.empty((len(rows), words), dtype=np.int32)
    if len(rows) == 1:
        matchers[rows[0]].llmatcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
    else:
        _executor().unsafe_compute_mask_ptr([(matchers[i].llmatcher, k) for k, i in enumerate(rows)],
                                            bits.ctypes.data, words * 4, len(rows))
    V = logits.size(-1)
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, count=min(V, 32 * words), bitorder="little").view(bool)
    if allowed.shape[1] < V:  # a model's vocabulary padded past its tokenizer's: those ids are never text
        allowed = np.pad(allowed, ((0, 0), (0, V - allowed.shape[1])))
    # Only the caller's stop ids end a row: llguidance's end-of-text, when it is none of them, would be
    # drawn as one more token and land in the text as a special token.
    allowed[:, [i for i in matchers[rows[0]].ends if i < allowed.shape[1]]] = False
    if stop_ids:
        allowed[:, list(stop_ids)] = np.array([matchers[i].complete for i in rows])[:, None]
    stuck_rows = ~allowed.any(axis=1)
    allowed[stuck_rows] = True  # to keep sampling finite; the engine drops what a stuck row draws
    mask = torch.from_numpy(allowed).to(logits.device)
    if len(rows) == len(matchers):
        out = torch.where(mask, logits, float("-inf"))
    else:
        out = logits.clone()
        index = torch.tensor(rows, device=logits.device)
        out[index] = torch.where(mask, logits[index], float("-inf"))
    stuck = [False] * len(matchers)
    for i, s in zip(rows, stuck_rows.tolist()):
        stuck[i] = s
    return out, stuck
