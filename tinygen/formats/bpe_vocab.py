"""How both exporters spell a tinygen tokenizer: a byte-level BPE in GPT-2's byte alphabet, with
merges derived from the ranks, and tinygen's chat template as Jinja.
"""

from __future__ import annotations

import json
from functools import lru_cache

from tinygen.core.template import ROLES, template_for
from tinygen.core.tokenizer import EOT, Tokenizer, unicode_to_byte
from tinygen.errors import TinygenError


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    return {b: ch for ch, b in unicode_to_byte().items()}


def token_text(raw: bytes) -> str:
    """A token's bytes in GPT-2's byte alphabet, as tokenizer.json and GGUF files spell tokens."""
    alphabet = _byte_to_unicode()
    return "".join(alphabet[b] for b in raw)


def merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """The BPE merges that reproduce tiktoken's encoding, in priority order.

    tiktoken merges any two neighbours whose concatenation is a token, the lowest-ranked result
    first. A merge list applies only the pairs it names, so every way of cutting a token into two
    tokens is listed, at the token's rank (as transformers' tiktoken converter does); listing only
    the pair that built the token would miss merges tiktoken makes."""
    rank = {raw: i for i, raw in enumerate(tokenizer.ranks) if raw is not None}
    out = []
    for raw in tokenizer.ranks:
        if raw is None or len(raw) == 1:
            continue
        pairs = [(raw[:k], raw[k:]) for k in range(1, len(raw)) if raw[:k] in rank and raw[k:] in rank]
        if not pairs:
            raise TinygenError(f"token {raw!r} is not two tokens joined, so no BPE merge makes it; this "
                               "tokenizer cannot be written as a byte-level BPE")
        pairs.sort(key=lambda p: (rank[p[0]], rank[p[1]]))
        out += [(token_text(a), token_text(b)) for a, b in pairs]
    return out


def special_name(tokenizer: Tokenizer, token_id: int | None) -> str | None:
    return next((name for name, i in tokenizer.special.items() if i == token_id), None)


def bos_name(tokenizer: Tokenizer) -> str | None:
    """The token that starts a text: the model's own BOS, else tinygen's <|endoftext|>, which opens
    every document and conversation in training (GPT-2's BOS too)."""
    return special_name(tokenizer, tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id)


def jinja_chat_template(tokenizer: Tokenizer) -> str | None:
    """The model's chat template as Jinja for tokenizer_config.json and GGUF: an imported model's own
    template as it came, tinygen's rendered as ChatSession does (<|endoftext|>, then each message
    between its role's prefix and suffix, then the generation prompt). None for a base model."""
    if tokenizer.jinja_template is not None:
        return tokenizer.jinja_template
    if tokenizer.chat_template is None:
        return None
    template = template_for(tokenizer)

    def text(s: str) -> str:
        # A Jinja string literal: Jinja unescapes as Python does, and JSON escapes are a subset.
        return json.dumps(s, ensure_ascii=False)

    roles = "".join(
        f"{{%- {'if' if i == 0 else 'elif'} message['role'] == {text(role)} -%}}"
        f"{{{{- {text(template.roles[role][0])} + message['content'] + {text(template.roles[role][1])} -}}}}"
        for i, role in enumerate(ROLES))
    lead = EOT if tokenizer.eot_id is not None else ""
    return (f"{{{{- {text(lead)} -}}}}"
            "{%- for message in messages -%}" + roles +
            "{%- else -%}{{- raise_exception('unknown chat role: ' + message['role']) -}}{%- endif -%}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{- {text(template.generation_prompt)} -}}}}{{%- endif -%}}")
