"""Text in, text out: the engine plus a tokenizer.

Encodes prompts, decodes streamed ids incrementally (whole UTF-8 characters only), applies stop
strings and constraints (constrain.py), and runs many requests, each with its own settings, seed
and constraint, through one continuously batched generation. Yields text and returns results;
printing is the CLI's job.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from tinygen.core.evaluate import document_start
from tinygen.core.tokenizer import StopMatcher, StreamDecoder, Tokenizer
from tinygen.errors import TinygenError
from tinygen.generate import engine
from tinygen.generate.constrain import Constraint, Guide, Matcher
from tinygen.generate.context import Context
from tinygen.generate.sampling import SamplingParams


@dataclass(frozen=True)
class Request:
    prompt: str
    params: SamplingParams
    max_new_tokens: int = 200
    stop: tuple[str, ...] = ()
    seed: int | None = None
    constraint: Constraint | None = None

    def __post_init__(self):
        if self.constraint is not None and self.stop:
            raise TinygenError(f"a stop string and a {self.constraint.label} constraint do not mix: the constraint "
                               "decides where the text ends")


@dataclass
class Completion:
    text: str = ""
    n_tokens: int = 0  # generated tokens, stop token excluded
    finish_reason: str = "length"  # "stop": end-of-text, a stop string or a finished constraint; "length": max tokens
    complete: bool | None = None  # with a constraint: whether the text satisfies it (else None)
    seconds: float = 0.0
    first_token_seconds: float | None = None
    pieces: list[str] = field(default_factory=list, repr=False)


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids a model reads for text: BOS first when the model expects it (Llama 3, Gemma)."""
    ids = tokenizer.encode(text)
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id, *ids]
    return ids


def start_kept(tokenizer: Tokenizer, ids: list[int]) -> int:
    """How many of a prompt's first ids stay when a long generation slides: its document start
    (BOS, or the end-of-text an empty prompt begins with), as llama.cpp keeps BOS; the text itself
    slides like everything after it."""
    return int(bool(ids) and ids[0] == document_start(tokenizer))


class TextGenerator:
    def __init__(self, model, tokenizer: Tokenizer, compiled=None):
        self.model = model
        self.compiled = compiled  # a compiled.StaticDecoder for single streams, or None
        self.tokenizer = tokenizer
        self.guide = Guide(tokenizer)
        self.device = model.device
        # A base model stops at end-of-text; the reserved chat token <|end|> also ends a turn, as do
        # an imported model's own end-of-sequence and end-of-turn tokens (Tokenizer.stop_ids).
        self.stop_ids = tokenizer.stop_ids

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt ids; an empty prompt starts from end-of-text, i.e. a fresh document."""
        ids = prompt_ids(self.tokenizer, prompt)
        if not ids:
            if self.tokenizer.eot_id is None:
                raise TinygenError("empty prompt, and this tokenizer has no <|endoftext|> to start from")
            ids = [self.tokenizer.eot_id]
        return ids

    def stream(self, request: Request, result: Completion | None = None, observe=None) -> Iterator[str]:
        """Text pieces of one completion as they are generated; fills result as it goes.
        observe is engine.generate's hook on each step's logits."""
        return self.stream_ids(self.encode_prompt(request.prompt), request, result, observe=observe)

    def stream_ids(self, ids: list[int], request: Request, result: Completion | None = None,
                   generator=None, stop_ids: tuple[int, ...] = (), observe=None,
                   context: Context | None = None, keep: int | None = None) -> Iterator[str]:
        """Like stream, from prompt ids (a chat turn renders its own); a caller's generator
        carries one random stream across calls, stop_ids add to the end-of-text stops, a context
        keeps the KV cache from one call to the next (context.Context), and the first `keep` ids
        stay when the context slides (default: start_kept)."""
        text = _Text(self.tokenizer, request, result)
        self.check([request])
        start = time.perf_counter()
        tokens = engine.stream(
            self.model, ids, request.params, request.max_new_tokens,
            stop_ids=tuple(dict.fromkeys(self.stop_ids + stop_ids)), generator=generator,
            seeds=None if generator is not None else [request.seed], done=lambda _row: text.stops.stopped,
            decoder=self.compiled, observe=observe, context=context,
            keep=start_kept(self.tokenizer, ids) if keep is None else keep,
            constraints=[self._matcher(request, lambda: text)],
        )
        for token in tokens:
            piece = text.push(token, time.perf_counter() - start)
            if piece:
                yield piece
        tail = text.settle(start)
        if tail:
            yield tail

    def run(self, requests: list[Request], batch_size: int) -> Iterator[Piece | Done]:
        """Many requests as one continuously batched generation: at most batch_size rows decode at
        once, whatever their settings, and a finished row hands its slot to the next request.
        Yields each completion's text pieces, then its Done, as they happen (rows interleave);
        in_order() sorts them for output."""
        prompts = [self.encode_prompt(r.prompt) for r in requests]
        self.check(requests)
        # Made when a row first produces and dropped when it is done, so a long run holds only
        # the rows in flight.
        live: dict[int, _Text] = {}
        finished: list[int] = []  # rows the engine has ended, in the order they ended
        start = time.perf_counter()

        def text(row: int) -> _Text:
            if row not in live:
                live[row] = _Text(self.tokenizer, requests[row])
            return live[row]

        def close() -> Iterator[Piece | Done]:
            while finished:
                row = finished.pop(0)
                tail = text(row).settle(start)
                if tail:
                    yield Piece(row, tail)
                yield Done(row, live.pop(row).result)

        steps = engine.generate(
            self.model, prompts, [r.params for r in requests], [r.max_new_tokens for r in requests],
            stop_ids=self.stop_ids, seeds=[r.seed for r in requests], done=lambda row: text(row).stops.stopped,
            batch_size=batch_size, finished=finished.append, keep=[start_kept(self.tokenizer, p) for p in prompts],
            constraints=[self._matcher(r, lambda i=i: text(i)) for i, r in enumerate(requests)],
        )
        for step in steps:
            now = time.perf_counter() - start
            for row, token in step:
                piece = text(row).push(token, now)
                if piece:
                    yield Piece(row, piece)
            yield from close()
        yield from close()

    def check(self, requests: list[Request]) -> None:
        """Refuse a constraint that cannot work here before anything is generated."""
        for i, r in enumerate(requests):
            if r.constraint is None:
                continue
            try:
                self.guide.check(r.constraint)
            except TinygenError as e:
                raise TinygenError(f"request {i + 1}: {e}" if len(requests) > 1 else str(e)) from None

    def _matcher(self, request: Request, text):
        """The engine's maker of the request's matcher, which the request's _Text (text() gives it) keeps."""
        if request.constraint is None:
            return None

        def make() -> Matcher:
            holder = text()
            holder.matcher = self.guide.matcher(request.constraint)
            return holder.matcher

        return make

    def samples(self, requests: list[Request], batch_size: int) -> Iterator[Piece | Done]:
        """Several samples of one prompt (one request per sample, each with its own seed), streamed
        one after another in order. The prompt is prefilled once and the samples decode as one
        batch; a single sample streams alone, through the compiled decoder if there is one."""
        if len(requests) > 1:
            yield from in_order(self.run(requests, batch_size))
            return
        result = Completion()
        for piece in self.stream(requests[0], result):
            yield Piece(0, piece)
        yield Done(0, result)

    def batch(self, requests: list[Request], batch_size: int) -> Iterator[tuple[int, Completion]]:
        """Completions of many requests as (index, completion), in input order, each as soon as it
        and every request before it are done."""
        for event in in_order(self.run(requests, batch_size)):
            if isinstance(event, Done):
                yield event.index, event.completion


@dataclass(frozen=True)
class Piece:
    index: int  # which request
    text: str


@dataclass(frozen=True)
class Done:
    index: int
    completion: Completion


def in_order(events: Iterable[Piece | Done]) -> Iterator[Piece | Done]:
    """The events of run() in input order: request 0's pieces as they come, then its Done, then
    request 1's (those already made come at once), and so on. Output that streams several
    completions one after another (--num-samples) reads like one completion at a time."""
    current, held = 0, {}
    for event in events:
        if event.index != current:
            held.setdefault(event.index, []).append(event)
            continue
        yield event
        while isinstance(event, Done):  # the next request's held events, and on if it is done too
            current += 1
            event = None
            for event in held.pop(current, []):
                yield event


class _Text:
    """One completion's text as its tokens arrive: whole UTF-8 characters, stop strings held back
    until they can be ruled out, and the figures of the Completion it fills."""

    def __init__(self, tokenizer: Tokenizer, request: Request, result: Completion | None = None):
        self.decoder = StreamDecoder(tokenizer)
        self.stops = StopMatcher(request.stop)
        self.max_new_tokens = request.max_new_tokens
        self.result = result if result is not None else Completion()
        self.matcher: Matcher | None = None  # the row's place in its constraint, once it starts

    def push(self, token: int, seconds: float) -> str:
        """The text that token makes safe to show (maybe none); seconds since the request began."""
        r = self.result
        if r.first_token_seconds is None:
            r.first_token_seconds = seconds
        r.n_tokens += 1
        piece = self.stops.feed(self.decoder.push(token))
        if piece:
            r.pieces.append(piece)
        return piece

    def settle(self, start: float) -> str:
        """Close the completion: flush what the decoder and stop matcher still hold, and fill in its
        text, time and finish reason. Returns the flushed tail, which may be empty."""
        r = self.result
        tail = self.stops.feed(self.decoder.flush()) + self.stops.flush()
        if tail:
            r.pieces.append(tail)
        r.text = "".join(r.pieces)
        r.seconds = time.perf_counter() - start
        finished = self.stops.stopped or (self.matcher is not None and self.matcher.stopped)
        r.finish_reason = "length" if r.n_tokens >= self.max_new_tokens and not finished else "stop"
        if self.matcher is not None:
            r.complete = self.matcher.complete
        return tail
