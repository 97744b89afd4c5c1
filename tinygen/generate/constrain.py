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

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

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
        self.tokenizer = tokenizer
        special = tokenizer.special_ids
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
        return Matcher(llmatcher, self.tokenizer.n_vocab)


class Matcher:
    """One row's place in its constraint: what the engine asks of it."""

    def __init__(self, llmatcher, n_tokens: int):
        self.llmatcher = llmatcher
        self.words = (n_tokens + 31) // 32  # a mask's int32 words, one bit per token

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
    return re.sub(r"^at (\d+)\((\d+)\): ", r"line \1, column \2: ", lines[0])


_executor = None


def masked(logits: torch.Tensor, matchers: Sequence[Matcher | None],
           stop_ids: Sequence[int]) -> tuple[torch.Tensor, list[bool]]:
    """The logits (B, V) with -inf for every token a row's matcher (None: no constraint) does not
    allow next, and which rows are stuck: allowed nothing at all, so they must end here. A row's
    stop ids are allowed once its text is complete."""
    global _executor
    rows = [i for i, m in enumerate(matchers) if m is not None]
    words = matchers[rows[0]].words
    bits = torch.empty(len(rows), words, dtype=torch.int32)
    if len(rows) == 1:
        matchers[rows[0]].llmatcher.unsafe_compute_mask_ptr(bits.data_ptr(), words * 4)
    else:  # llguidance's own threads, which the GIL does not hold up
        if _executor is None:
            _executor = require().LLExecutor()
        _executor.unsafe_compute_mask_ptr([(matchers[i].llmatcher, k) for k, i in enumerate(rows)],
                                          bits.data_ptr(), words * 4, len(rows))
    device, V = logits.device, logits.size(-1)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((bits.to(device)[:, :, None] >> shifts) & 1).bool().flatten(1)  # (R, 32 * words)
    # A model's vocabulary may be padded past its tokenizer's: those ids are never text.
    allowed = allowed[:, :V] if allowed.size(1) >= V else torch.nn.functional.pad(allowed, (0, V - allowed.size(1)))
    if stop_ids:
        stops = torch.tensor(list(stop_ids), device=device)
        allowed[:, stops] = torch.tensor([matchers[i].complete for i in rows], device=device)[:, None]
    stuck_rows = (~allowed.any(-1)).tolist()
    # A stuck row draws from all tokens, to keep sampling finite; the engine drops what it draws.
    allowed[torch.tensor(stuck_rows, device=device)] = True
    out = logits.clone()
    index = torch.tensor(rows, device=device)
    out[index] = logits[index].masked_fill(~allowed, float("-inf"))
    stuck = [False] * len(matchers)
    for i, s in zip(rows, stuck_rows):
        stuck[i] = s
    return out, stuck
