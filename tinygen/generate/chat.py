"""A multi-turn conversation with a model: history as token ids, trimmed to fit the context.

The session renders each message once, under the model's own chat template (template.py), and
keeps the ids; a turn's prompt is those ids joined. When a prompt would leave too little room for
the reply, the oldest exchanges go first; the opening (BOS) and the system prompt always stay, in
the prompt and in the context when a long reply slides past its end (llama.cpp's n_keep; a
system prompt longer than half the context keeps its start). No printing here:
`reply` yields text and leaves its figures in `last`, and the REPL shows them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from tinygen.core.evaluate import document_start
from tinygen.core.template import ROLES, Renderer, template_for
from tinygen.errors import TinygenError
from tinygen.generate import engine
from tinygen.generate.constrain import Constraint
from tinygen.generate.context import Context
from tinygen.generate.sampling import SamplingParams
from tinygen.generate.textgen import Completion, Request, TextGenerator

# What `/set` may change, and the type each value parses as.
SETTINGS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
            "repetition_penalty": float, "max_tokens": int, "seed": int}


@dataclass
class Message:
    role: str
    content: str
    ids: list[int] = field(repr=False)


@dataclass
class Turn:
    """Figures of the last reply."""

    completion: Completion
    trimmed: int = 0  # messages dropped from the front of the history to make room
    context: int = 0  # tokens in the prompt plus the reply
    reused: int = 0  # prompt tokens whose keys and values the previous turn left in the cache
    interrupted: bool = False


def conversation_lead(renderer: Renderer) -> list[int]:
    """The ids a conversation opens with: a model's own template's lead (BOS, or nothing), or under
    tinygen's template a fresh document's start (evaluate.document_start). Chat fine-tuning opens
    each conversation the same way."""
    if renderer.template.lead is not None:
        return renderer.fixed(renderer.template.lead)
    start = document_start(renderer.tokenizer)
    return [start] if start is not None else []


class ChatSession:
    def __init__(self, model, tokenizer, params: SamplingParams = SamplingParams(), *, max_tokens: int = 256,
                 seed: int | None = None, system: str | None = None, compiled=None, keep_cache: bool = True,
                 constraint: Constraint | None = None):
        self.textgen = TextGenerator(model, tokenizer, compiled=compiled)
        self.constraint = constraint  # what every reply must be (constrain.py), or None
        if constraint is not None:
            self.textgen.guide.check(constraint)
        self.tokenizer = tokenizer
        self.template = template_for(tokenizer)
        self.renderer = Renderer(tokenizer, self.template)
        self.params = params
        self.max_tokens = max_tokens
        self.seed = seed
        self.rng = engine.make_generator(seed, self.textgen.device)
        self.system: Message | None = None
        self.messages: list[Message] = []  # user and assistant turns, oldest first
        self.last: Turn | None = None
        # The KV cache outlives a turn: the next prompt is this one plus the reply and a new
        # message, so only those are prefilled. History edits need no call here: the cache is
        # reused only as far as the new prompt's ids match the ones it holds.
        self.kv = Context() if keep_cache else None
        # A chat-tuned model may skip <|end|> and open the next turn itself; that ends the reply too.
        self._stop_ids = tuple(dict.fromkeys(self.renderer.stop_ids + tokenizer.stop_ids + tuple(
            tokenizer.special[p] for p, _ in self.template.roles.values() if p in tokenizer.special)))
        self.set_system(system)

    @property
    def block_size(self) -> int:
        return self.textgen.block_size

    # -- history -------------------------------------------------------------------------------

    def _message(self, role: str, content: str) -> Message:
        return Message(role, content, self.renderer.message(role, content)[0])

    def set_system(self, text: str | None) -> None:
        # A model whose own template falls back on a system prompt gets it, as its template would.
        text = text or self.template.default_system
        self.system = self._message("system", text) if text else None

    def reset(self) -> None:
        self.messages.clear()

    def undo(self) -> int:
        """Drop the last exchange (the last user message and whatever followed it); returns how many messages went."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].role == "user":
                n = len(self.messages) - i
                del self.messages[i:]
                return n
        return 0

    def transcript(self) -> list[dict]:
        msgs = ([self.system] if self.system else []) + self.messages
        return [{"role": m.role, "content": m.content} for m in msgs]

    def save(self, path: str | Path) -> None:
        """Write the transcript as {"messages": [...]}. A folder that does not exist is a TinygenError
        (atomic's rule), so a mistyped path makes no folders."""
        from tinygen import atomic

        atomic.write_bytes(Path(path), (json.dumps({"messages": self.transcript()}, indent=2, ensure_ascii=False)
                                        + "\n").encode())

    def load(self, path: str | Path) -> int:
        """Replace the conversation with a saved one ({"messages": [...]} or a bare list); returns its length."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise TinygenError(f"cannot read {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise TinygenError(f"{path} is not JSON: {e}") from None
        raw = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(raw, list) or not all(isinstance(m, dict) and m.get("role") in ROLES
                                                and isinstance(m.get("content"), str) for m in raw):
            raise TinygenError(f'{path}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
        systems = [m["content"] for m in raw if m["role"] == "system"]
        self.set_system(systems[-1] if systems else None)
        self.messages = [self._message(m["role"], m["content"]) for m in raw if m["role"] != "system"]
        return len(raw)

    def fixed_ids(self) -> list[int]:
        """The ids every prompt starts with, which never leave the context: the opening and the
        system prompt."""
        return conversation_lead(self.renderer) + (self.system.ids if self.system else [])

    def prompt_ids(self) -> list[int]:
        ids = self.fixed_ids()
        for i, m in enumerate(self.messages):
            # Gemma 3 writes the system prompt inside the first user turn, which then goes without its opener.
            first = i == 0 and self.system is not None and self.template.system_in_user
            ids += self.renderer.message(m.role, m.content, after="system")[0] if first else m.ids
        return ids + self.renderer.generation_prompt()

    def _trim(self) -> int:
        """Drop the oldest exchanges until the prompt leaves room for a reply; returns messages dropped."""
        room = min(self.max_tokens, self.block_size // 2)
        dropped = 0
        while len(self.prompt_ids()) + room > self.block_size and len(self.messages) > 1:
            del self.messages[0]
            dropped += 1
            while self.messages and self.messages[0].role != "user":  # never open on an orphan reply
                del self.messages[0]
                dropped += 1
        return dropped

    # -- settings ------------------------------------------------------------------------------

    def settings(self) -> dict:
        return {"temperature": self.params.temperature, "top_k": self.params.top_k, "top_p": self.params.top_p,
                "min_p": self.params.min_p, "repetition_penalty": self.params.repetition_penalty,
                "max_tokens": self.max_tokens, "seed": self.seed}

    def set(self, name: str, value: str) -> None:
        if name not in SETTINGS:
            raise TinygenError(f"unknown setting {name!r}; one of {', '.join(SETTINGS)}")
        try:
            parsed = SETTINGS[name](value)
        except ValueError:
            raise TinygenError(f"{name} takes {'an integer' if SETTINGS[name] is int else 'a number'}, "
                               f"got {value!r}") from None
        if name == "max_tokens":
            if parsed < 1:
                raise TinygenError("max_tokens must be at least 1")
            self.max_tokens = parsed
        elif name == "seed":
            self.seed = parsed
            self.rng = engine.make_generator(parsed, self.textgen.device)
        else:
            self.params = replace(self.params, **{name: parsed})  # SamplingParams validates

    # -- a turn --------------------------------------------------------------------------------

    def reply(self, text: str):
        """Add the user's message and stream the model's reply. The reply joins the history even
        when interrupted (Ctrl-C, or the caller closing this generator), as far as it got."""
        self.messages.append(self._message("user", text))
        trimmed = self._trim()
        prompt = self.prompt_ids()
        if len(prompt) >= self.block_size:
            self.messages.pop()
            raise TinygenError(f"that message is too long: the prompt needs {len(prompt)} tokens and the model's "
                               f"context holds {self.block_size}")
        result = Completion()
        self.last = Turn(result, trimmed, len(prompt), interrupted=True)
        # Under a constraint the reply ends where it is complete, and its end-of-turn token; the
        # template's stop strings (a plain transcript's "User:") could cut it short.
        stops = () if self.constraint is not None else self.renderer.stop_strings
        request = Request("", self.params, self.max_tokens, stops, constraint=self.constraint)
        try:
            yield from self.textgen.stream_ids(prompt, request, result, generator=self.rng, stop_ids=self._stop_ids,
                                               context=self.kv, keep=len(self.fixed_ids()))
            self.last.interrupted = False
        finally:
            self.last.reused = self.kv.reused if self.kv else 0
            content = (result.text if not self.last.interrupted else "".join(result.pieces)).strip()
            self.messages.append(self._message("assistant", content))
            self.last.context = len(prompt) + result.n_tokens
