"""Text in, text out: the engine plus a tokenizer.

Encodes prompts, decodes streamed ids incrementally (whole UTF-8 characters only), applies stop
strings, and runs many requests through continuously batched generation. Yields text and
returns results; printing is the CLI's job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tinygen.core.tokenizer import StopMatcher, StreamDecoder, Tokenizer
from tinygen.errors import TinygenError
from tinygen.generate import engine
from tinygen.generate.sampling import SamplingParams


@dataclass(frozen=True)
class Request:
    prompt: str
    params: SamplingParams
    max_new_tokens: int = 200
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Completion:
    text: str = ""
    tokens: int = 0  # generated tokens, stop token excluded
    finish_reason: str = "length"  # "stop": end-of-text or a stop string; "length": max tokens
    prompt_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float | None = None
    pieces: list[str] = field(default_factory=list, repr=False)


class TextGenerator:
    def __init__(self, model, tokenizer: Tokenizer, compiled=None):
        self.model = model
        self.compiled = compiled  # a compiled.StaticDecoder for single streams, or None
        self.tokenizer = tokenizer
        self.device = model.device
        # A base model stops at end-of-text; the reserved chat token <|end|> also ends a turn.
        self.stop_ids = tuple(t for t in (tokenizer.eot_id, tokenizer.special.get("<|end|>")) if t is not None)

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt ids; an empty prompt starts from end-of-text, i.e. a fresh document."""
        ids = self.tokenizer.encode(prompt)
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
                   generator=None, stop_ids: tuple[int, ...] = (), observe=None) -> Iterator[str]:
        """Like stream, from prompt ids (a chat turn renders its own); a caller's generator
        carries one random stream across calls, and stop_ids add to the end-of-text stops."""
        result = result if result is not None else Completion()
        result.prompt_tokens = len(ids)
        decoder, stops = StreamDecoder(self.tokenizer), StopMatcher(request.stop)
        gen = generator if generator is not None else engine.make_generator(request.seed, self.device)
        start = time.perf_counter()
        tokens = engine.stream(
            self.model, ids, request.params, request.max_new_tokens,
            stop_ids=tuple(dict.fromkeys(self.stop_ids + stop_ids)), generator=gen, done=lambda _row: stops.stopped,
            decoder=self.compiled, observe=observe,
        )
        for token in tokens:
            if result.first_token_seconds is None:
                result.first_token_seconds = time.perf_counter() - start
            result.tokens += 1
            piece = stops.feed(decoder.push(token))
            if piece:
                result.pieces.append(piece)
                yield piece
        tail = _settle(result, decoder, stops, request.max_new_tokens, start)
        if tail:
            yield tail

    def complete(self, request: Request) -> Completion:
        result = Completion()
        for _ in self.stream(request, result):
            pass
        return result

    def batch(self, requests: list[Request], batch_size: int) -> Iterator[tuple[int, Completion]]:
        """Completions of many requests as (index, completion), in input order, each yielded as
        soon as it and every request before it are done.

        Requests that share sampling settings run as one continuously batched generation: at most
        batch_size rows decode at once, and a finished row hands its slot to the next request.
        """
        encoded = [self.encode_prompt(r.prompt) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.params, r.max_new_tokens, r.stop, r.seed), []).append(i)
        done: dict[int, Completion] = {}
        next_out = 0
        for members in groups.values():
            for index, result in self._run_group(members, requests, encoded, batch_size):
                done[index] = result
                while next_out in done:
                    yield next_out, done.pop(next_out)
                    next_out += 1

    def _run_group(self, members: list[int], requests: list[Request], encoded: list[list[int]],
                   batch_size: int) -> Iterator[tuple[int, Completion]]:
        first = requests[members[0]]
        decoders = [StreamDecoder(self.tokenizer) for _ in members]
        stops = [StopMatcher(first.stop) for _ in members]
        results = [Completion(prompt_tokens=len(encoded[i])) for i in members]
        finished: list[int] = []  # rows the engine has ended, in the order they ended
        start = time.perf_counter()

        def close() -> Iterator[tuple[int, Completion]]:
            while finished:
                row = finished.pop(0)
                _settle(results[row], decoders[row], stops[row], first.max_new_tokens, start)
                yield members[row], results[row]

        steps = engine.generate(
            self.model, [encoded[i] for i in members], first.params, first.max_new_tokens,
            stop_ids=self.stop_ids, generator=engine.make_generator(first.seed, self.device),
            done=lambda row: stops[row].stopped, batch_size=batch_size, finished=finished.append,
        )
        for step in steps:
            now = time.perf_counter() - start
            for row, token in step:
                r = results[row]
                if r.first_token_seconds is None:
                    r.first_token_seconds = now
                r.tokens += 1
                r.pieces.append(stops[row].feed(decoders[row].push(token)))
            yield from close()
        yield from close()


def _settle(result: Completion, decoder: StreamDecoder, stops: StopMatcher, max_new_tokens: int, start: float) -> str:
    """Close a completion: flush the text its decoder and stop matcher still hold, and fill in its
    text, time and finish reason. Returns the flushed tail, which may be empty."""
    tail = stops.feed(decoder.flush()) + stops.flush()
    if tail:
        result.pieces.append(tail)
    result.text = "".join(result.pieces)
    result.seconds = time.perf_counter() - start
    result.finish_reason = "length" if result.tokens >= max_new_tokens and not stops.stopped else "stop"
    return tail
