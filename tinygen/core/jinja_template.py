"""A model's own Jinja chat template (GGUF `tokenizer.chat_template`, tokenizer_config.json's
`chat_template`), rendered as transformers' `apply_chat_template` renders it.

A template is code that came with a downloaded file, so it runs in jinja2's immutable sandbox.
jinja2 is imported only when a template is first compiled, so that tinygen starts fast.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property, lru_cache

from tinygen.errors import TinygenError

# Markers of well-known formats, for `tinygen info`; the first one found names the template.
FAMILIES = (("<|im_start|>", "ChatML"), ("<|start_header_id|>", "Llama 3"), ("[INST]", "Llama 2 / Mistral"),
            ("<start_of_turn>", "Gemma"), ("<|user|>", "Zephyr / Phi"))
# Stand-ins that no template rewrites, for finding where a system message lands.
_SYSTEM = "SYSTEM-MESSAGE-PLACEHOLDER"
_USER = "USER-MESSAGE-PLACEHOLDER"


class JinjaChatTemplate:
    """Renders conversations ([{"role": ..., "content": ...}, ...]) into a model's prompt text."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        self.source = source
        # Passed only when known: transformers leaves unset tokens out, and templates test `bos_token is defined`.
        self.tokens = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}

    @property
    def name(self) -> str:
        return next((family for marker, family in FAMILIES if marker in self.source), "custom")

    @property
    def first_line(self) -> str:
        line = next((line.strip() for line in self.source.splitlines() if line.strip()), "")
        return line if len(line) <= 60 else line[:59] + "…"

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """The prompt text for `messages`; with add_generation_prompt, it ends where the assistant's
        reply begins. `variables` reach the template too (e.g. `tools`), as in transformers."""
        import jinja2

        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TinygenError("a conversation is a list of messages, each an object with a role and content")
        # transformers drops keys whose value is None: many templates print "None" or fail on them.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {"tools": None, "documents": None, **self.tokens, **variables}
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError, RecursionError) as e:
            raise TinygenError(f"the chat template failed: {_one_line(e)}") from None

    @cached_property
    def default_system_prompt(self) -> str | None:
        """The system message the template writes when the conversation has none (SmolLM2's "You
        are a helpful AI assistant named SmolLM, ..."), found by rendering with and without one."""
        user = {"role": "user", "content": _USER}
        try:
            alone = self.render([user], add_generation_prompt=False)
            given = self.render([{"role": "system", "content": _SYSTEM}, user], add_generation_prompt=False)
        except TinygenError:  # e.g. Gemma's templates refuse a system role
            return None
        before, found, after = given.partition(_SYSTEM)
        if (not found or len(alone) <= len(before) + len(after)
                or not alone.startswith(before) or not alone.endswith(after)):
            return None
        return alone[len(before):len(alone) - len(after)]

    @cached_property
    def _compiled(self):
        import jinja2

        try:
            return _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise TinygenError(f"the chat template has a syntax error on line {e.lineno}: {_one_line(e)}") from None
        except jinja2.TemplateError as e:
            raise TinygenError(f"the chat template cannot be compiled: {_one_line(e)}") from None


@lru_cache(maxsize=1)
def _environment():
    """The environment transformers builds in `_compile_jinja_template`: blocks trimmed, loop
    controls, `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII and HTML as is."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}` marks the assistant's text for transformers' training masks; a prompt
        only needs the text inside."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _one_line(e: Exception) -> str:
    return " ".join(str(getattr(e, "message", None) or e).split()) or type(e).__name__
