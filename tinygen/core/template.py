"""Chat templates: how a conversation becomes one token sequence, and which of its tokens train.

A chat-tuned model carries its template in its tokenizer metadata (`chat_template`), so it renders
conversations as it was fine-tuned on them, from the special tokens every tinygen tokenizer reserves:

    <|system|>You are kind.<|end|><|user|>Hi!<|end|><|assistant|>Hello! How are you?<|end|>

Role markers are special tokens and message contents are always encoded as ordinary text, so no user
text can forge them. A base model gets PLAIN, a "User:" / "Assistant:" transcript it can continue.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tinygen.core.tokenizer import CHAT_TOKENS, Tokenizer
from tinygen.errors import TinygenError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    roles: dict[str, tuple[str, str]]  # role -> (prefix, suffix) around the message text
    generation_prompt: str  # opens the assistant turn the model is asked to write
    stop: tuple[str, ...]  # ends a reply: special tokens stop on their id, other strings as text
    tuned: bool = True  # False for PLAIN: the model was never taught this format
    # Set for a model's own Jinja template (from_jinja): the text before the first message (None:
    # tinygen's convention, end-of-text), the system prompt it falls back on, and its name.
    lead: str | None = None
    default_system: str | None = None
    name: str = "tinygen"
    # Gemma 3 writes the system message inside the first user turn, not in a turn of its own: the
    # system role's prefix opens that turn, its suffix parts it from the user's text, and the user
    # message right after a system message goes without its own prefix.
    system_in_user: bool = False
    trim: tuple[str, ...] = ()  # roles whose text the template strips of surrounding whitespace (`| trim`)

    def to_dict(self) -> dict:
        d = {"roles": {r: list(ps) for r, ps in self.roles.items()}, "generation_prompt": self.generation_prompt,
             "stop": list(self.stop)}
        if self.lead is not None:  # a model's own template, taken apart (from_jinja)
            d.update(lead=self.lead, default_system=self.default_system, name=self.name)
        # Written only when set, so that a template without them reads as it did before they existed.
        if self.system_in_user:
            d["system_in_user"] = True
        if self.trim:
            d["trim"] = list(self.trim)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ChatTemplate:
        def strings(value, n: int | None = None) -> bool:
            return (isinstance(value, list) and all(isinstance(s, str) for s in value)
                    and (n is None or len(value) == n))

        try:
            roles = d["roles"]
            if not isinstance(roles, dict) or set(roles) != set(ROLES):
                raise ValueError(f"roles must be {', '.join(ROLES)}")
            if not all(strings(ps, 2) for ps in roles.values()):
                raise ValueError("each role needs a [prefix, suffix] pair of strings")
            if not isinstance(d["generation_prompt"], str) or not strings(d["stop"]) or not d["stop"]:
                raise ValueError("generation_prompt must be a string and stop a list of strings")
            extra = {k: d[k] for k in ("lead", "default_system", "name") if k in d}
            if not all(isinstance(v, str) for k, v in extra.items() if not (k == "default_system" and v is None)):
                raise ValueError("lead, default_system and name must be strings")
            if not isinstance(d.get("system_in_user", False), bool):
                raise TypeError("system_in_user must be true or false")
            if not strings(d.get("trim", [])) or not set(d.get("trim", [])) <= set(ROLES):
                raise ValueError(f"trim must list roles among {', '.join(ROLES)}")
            return cls({r: tuple(ps) for r, ps in roles.items()}, d["generation_prompt"], tuple(d["stop"]), **extra,
                       system_in_user=d.get("system_in_user", False), trim=tuple(d.get("trim", ())))
        except (KeyError, TypeError, ValueError) as e:
            raise TinygenError(f"checkpoint chat template is malformed ({e})") from e

    def parts(self, role: str, content: str, after: str | None = None) -> tuple[str, str, str]:
        """(prefix, text, suffix) of one message as the template writes it; `after` is the role of
        the message before it (None for the first)."""
        prefix, suffix = self.roles[role]
        if self.system_in_user and role == "user" and after == "system":
            prefix = ""  # the system message opened this turn
        return prefix, content.strip() if role in self.trim else content, suffix

    def text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as one text, message by message: what the Renderer encodes, and what a
        template taken apart (from_jinja) is checked against its source with."""
        out, after = [self.lead or ""], None
        for m in messages:
            out += self.parts(m["role"], m["content"], after)
            after = m["role"]
        return "".join(out) + (self.generation_prompt if add_generation_prompt else "")


# What `tinygen train --chat` teaches. <|end|> closes every turn, so the model learns to stop.
SPECIAL = ChatTemplate(
    roles={"system": ("<|system|>", "<|end|>"), "user": ("<|user|>", "<|end|>"),
           "assistant": ("<|assistant|>", "<|end|>")},
    generation_prompt="<|assistant|>",
    stop=("<|end|>",),
)

# For base models: a transcript they can continue, one line per turn. A newline or "User:" ends
# the reply: the model has finished its line, or started to write the user's.
PLAIN = ChatTemplate(
    roles={"system": ("", "\n\n"), "user": ("User: ", "\n"), "assistant": ("Assistant: ", "\n")},
    generation_prompt="Assistant:",
    stop=("\n", "User:"),
    tuned=False,
)


# How a model's own Jinja template becomes a ChatTemplate: formats/jinja.py's from_jinja, which the
# formats package registers (core never imports formats/).
_jinja_readers: list[Callable[[Tokenizer], ChatTemplate]] = []


def register_jinja_reader(read: Callable[[Tokenizer], ChatTemplate]) -> None:
    if read not in _jinja_readers:
        _jinja_readers.append(read)


def template_for(tokenizer: Tokenizer) -> ChatTemplate:
    """The model's own template, or PLAIN when it was never chat-tuned."""
    # A stored template first: a converted model keeps its Jinja template taken apart, so loading
    # it needs no jinja2.
    if tokenizer.chat_template is None and tokenizer.jinja_template is not None:
        if not _jinja_readers:
            raise TinygenError("this model's chat template is Jinja, and no Jinja reader is registered "
                               "(import tinygen.formats)")
        return _jinja_readers[0](tokenizer)
    if tokenizer.chat_template is None:
        return PLAIN
    template = ChatTemplate.from_dict(tokenizer.chat_template)
    missing = [t for t in special_parts(template) if t not in tokenizer.special]
    if missing:
        raise TinygenError(f"the chat template uses {', '.join(missing)}, which the tokenizer lacks")
    return template


def with_chat_template(tokenizer: Tokenizer, template: ChatTemplate = SPECIAL) -> tuple[Tokenizer, int]:
    """The tokenizer with the template's special tokens added (after the existing ids) and the
    template recorded. Returns it and the number of tokens added, so the caller can grow the
    embeddings to match."""
    special = dict(tokenizer.special)
    added = 0
    for token in CHAT_TOKENS:
        if token not in special:
            special[token] = tokenizer.n_vocab + added
            added += 1
    # Through its serialised form, so every other setting (BOS, stop ids, ...) carries over.
    out = Tokenizer.from_dict({**tokenizer.to_dict(), "special": special, "chat_template": template.to_dict()})
    return out, added


def special_parts(template: ChatTemplate, special: Iterable[str] = ()) -> set[str]:
    """The special tokens in the template's fixed text: those written like specials (`<|...|>`),
    and those of `special` (a tokenizer's, such as Gemma's <start_of_turn>) found in it."""
    fixed = "\0".join([*(p for ps in template.roles.values() for p in ps), template.generation_prompt,
                       *template.stop, template.lead or ""])
    return set(re.findall(r"<\|[^|<>]+\|>", fixed)) | set(markers(fixed, special))


def markers(text: str, special: Iterable[str]) -> list[str]:
    """The tokens of `special` found in `text`, in order of where they first occur (the longest
    first where two start together). Whitespace tokens (Gemma's "\n\n") mark nothing: the
    tokenizer encodes them as plain text alike."""
    found = [(text.find(s), -len(s), s) for s in special if s.strip() and s in text]
    return [s for _, _, s in sorted(found)]


class Renderer:
    """Encodes messages under a template. The template's own text may hold special tokens;
    message contents never do (`<|end|>` typed by a user stays plain text)."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate):
        self.tokenizer = tokenizer
        self.template = template
        self._specials = special_parts(template, tokenizer.special) & set(tokenizer.special)
        by_length = sorted(self._specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if by_length else None
        # Stop markers that are single special tokens stop generation by id; the rest by text.
        self.stop_ids = tuple(tokenizer.special[s] for s in template.stop if s in tokenizer.special)
        self.stop_strings = tuple(s for s in template.stop if s not in tokenizer.special)

    def _pieces(self, fixed: str) -> list[str | int]:
        if self._split is None:
            return [fixed] if fixed else []
        # Whitespace that names a special token (Gemma's "\n\n") stays text, encoded with its neighbours.
        return [self.tokenizer.special[p] if p in self._specials else p for p in self._split.split(fixed) if p]

    def message(self, role: str, content: str, train: bool = False,
                after: str | None = None) -> tuple[list[int], list[int]]:
        """(ids, mask) of one message; `after` is the role of the message before it, which some
        templates write a message differently after (ChatTemplate.system_in_user). With train=True
        the mask marks the assistant's text and its closing marker: the tokens a fine-tune should
        learn to produce."""
        if role not in self.template.roles:
            raise TinygenError(f"unknown chat role {role!r}; use one of {', '.join(ROLES)}")
        prefix, content, suffix = self.template.parts(role, content, after)
        learn = train and role == "assistant"
        # (piece, trained) runs: neighbouring plain text is encoded together so BPE sees whole words.
        runs: list[tuple[str | int, bool]] = [(p, False) for p in self._pieces(prefix)]
        runs += [(content, learn)] + [(p, learn) for p in self._pieces(suffix)]
        ids: list[int] = []
        mask: list[int] = []
        text, text_learn = "", False
        for piece, trained in runs + [(-1, False)]:
            if isinstance(piece, str) and (not text or trained == text_learn or not train):
                text, text_learn = text + piece, trained
                continue
            if text:
                encoded = self.tokenizer.encode(text, special=False)
                ids += encoded
                mask += [int(text_learn)] * len(encoded)
                text = ""
            if isinstance(piece, str):
                text, text_learn = piece, trained
            elif piece >= 0:
                ids.append(piece)
                mask.append(int(trained))
        return ids, mask

    def fixed(self, text: str) -> list[int]:
        """Ids of template text: its special tokens by id, the rest as plain text."""
        out: list[int] = []
        for piece in self._pieces(text):
            out += [piece] if isinstance(piece, int) else self.tokenizer.encode(piece, special=False)
        return out

    def generation_prompt(self) -> list[int]:
        return self.fixed(self.template.generation_prompt)

    def conversation(self, messages: list[dict], train: bool = False) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        after = None
        for m in messages:
            i, k = self.message(m["role"], m["content"], train, after)
            ids += i
            mask += k
            after = m["role"]
        return ids, mask
