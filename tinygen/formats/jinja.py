"""A model's own Jinja chat template (GGUF `tokenizer.chat_template`, tokenizer_config.json's
`chat_template`), rendered as transformers' `apply_chat_template` renders it, and taken apart into
the per-message pieces of a ChatTemplate (from_jinja), which core/template.py renders without jinja2.

A template is code that came with a downloaded file, so it runs in jinja2's immutable sandbox.
jinja2 is imported only when a template is first compiled, so that tinygen starts fast.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property, lru_cache
from typing import ClassVar

from tinygen.core.template import ROLES, ChatTemplate, markers
from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError, one_line

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
            raise TinygenError(f"the chat template failed: {one_line(e)}") from None

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
            raise TinygenError(f"the chat template has a syntax error on line {e.lineno}: {one_line(e)}") from None
        except jinja2.TemplateError as e:
            raise TinygenError(f"the chat template cannot be compiled: {one_line(e)}") from None


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

        tags: ClassVar[set[str]] = {"generation"}

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


# Stand-ins for message text while a Jinja template is taken apart: plain words no template
# rewrites, each unlike any template text.
_PROBES = {"system": "Sys7tem5Probe", "user": "Us3rProbe", "assistant": "Ass1stantProbe"}
_FOLLOW_UP = "F0llowUpProbe"  # a second user message, whose turn opens as every later one does


def from_jinja(tokenizer: Tokenizer) -> ChatTemplate:
    """A model's own Jinja chat template (tokenizer.jinja_template) as per-message prefixes and
    suffixes, so that a conversation is rendered one message at a time (a message's ids never
    change when later ones are added), and checked against the template itself on conversations
    with and without a system prompt, with text padded in whitespace too. A system message is a
    turn of its own or, as Gemma 3 writes it, the start of the first user turn. A template that
    does not render messages that way (one that changes earlier text as the conversation grows)
    is refused."""
    names = {i: n for n, i in tokenizer.special.items()}
    bos = names.get(tokenizer.bos_id)
    jt = JinjaChatTemplate(tokenizer.jinja_template, bos, names.get(tokenizer.eos_id))
    s, u, a = (_PROBES[r] for r in ROLES)
    msgs = [{"role": "system", "content": s}, {"role": "user", "content": u}, {"role": "assistant", "content": a}]
    full = jt.render(msgs, add_generation_prompt=False)
    base = jt.render(msgs[:2], add_generation_prompt=False)
    asked = jt.render(msgs[:2], add_generation_prompt=True)

    def fail(why: str) -> TinygenError:
        return TinygenError(f"the model's chat template ({jt.name}) cannot be rendered message by message: {why}")

    if not (asked.startswith(base) and full.startswith(base) and all(p in full for p in (s, u, a))):
        raise fail("adding messages changes what came before")
    generation = asked[len(base):]
    lead_sys, rest = full.split(s, 1)
    between_su, rest = rest.split(u, 1)
    between_ua, a_suffix = rest.split(a, 1)
    if not between_ua.endswith(generation):
        raise fail("the assistant's turn opens unlike its generation prompt")
    u_suffix = between_ua[: len(between_ua) - len(generation)]
    folded = not between_su.startswith(u_suffix)
    if folded:  # the system text sits inside the first user turn (Gemma 3), before the user's own
        u_prefix = _user_opener(jt, msgs, a_suffix, fail)
        lead, opened, s_inside = lead_sys.partition(u_prefix)
        if not (u_prefix and opened):
            raise fail("the system message is neither a turn of its own nor inside the first user turn")
        s_prefix, s_suffix = u_prefix + s_inside, between_su
    else:  # every role is assumed to close its turn alike; checked below
        s_suffix, u_prefix = u_suffix, between_su[len(u_suffix):]
        # The lead is what sits before the first turn's role marker, e.g. BOS.
        lead = bos if bos and lead_sys.startswith(bos) and not u_prefix.startswith(bos) else ""
        s_prefix = lead_sys[len(lead):]
    stops = markers(a_suffix, tokenizer.special)[:1]
    if not stops:
        raise fail("no special token ends the assistant's turn")
    template = ChatTemplate(
        roles={"system": (s_prefix, s_suffix), "user": (u_prefix, u_suffix), "assistant": (generation, a_suffix)},
        generation_prompt=generation, stop=tuple(stops), lead=lead, default_system=jt.default_system_prompt,
        name=jt.name, system_in_user=folded, trim=_trimmed(jt, msgs, full),
    )
    _check_against(template, jt, fail)
    return template


def _user_opener(jt: JinjaChatTemplate, msgs: list[dict], a_suffix: str, fail) -> str:
    """What opens a user turn that follows an assistant's (the first may open otherwise)."""
    more = jt.render([*msgs, {"role": "user", "content": _FOLLOW_UP}], add_generation_prompt=False)
    between = more.split(msgs[-1]["content"], 1)[-1].split(_FOLLOW_UP, 1)[0]
    if _FOLLOW_UP not in more or not between.startswith(a_suffix):
        raise fail("the assistant's turn closes unlike it does at the end")
    return between[len(a_suffix):]


def _trimmed(jt: JinjaChatTemplate, msgs: list[dict], full: str) -> tuple[str, ...]:
    """The roles whose text the template strips of surrounding whitespace (Jinja's `| trim`):
    padded, their text renders as it does bare."""
    padded = [[*msgs[:i], {**m, "content": f" \n{m['content']}\n "}, *msgs[i + 1:]] for i, m in enumerate(msgs)]
    return tuple(m["role"] for m, convo in zip(msgs, padded) if jt.render(convo, add_generation_prompt=False) == full)


def _check_against(template: ChatTemplate, jt, fail) -> None:
    """Per-message rendering equals the Jinja template's on conversations of several shapes: with
    and without a system prompt, and with text that starts or ends in whitespace."""
    turns = [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello. How can I help?"},
             {"role": "user", "content": "Tell me\na story."}]
    padded = [{**m, "content": f"\n {m['content']}  "} for m in turns]
    system = template.default_system
    for convo in (turns, [{"role": "system", "content": "Be brief."}, *turns], padded,
                  [{"role": "system", "content": " Be brief.\n"}, *padded]):
        shown = convo if convo[0]["role"] == "system" or system is None else \
            [{"role": "system", "content": system}, *convo]
        if template.text(shown) != jt.render(convo, add_generation_prompt=True):
            raise fail("its output differs from the per-message rendering")
