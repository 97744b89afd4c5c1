"""What a model's tokenizer files say beyond the vocabulary itself, read alike for every kind of
vocabulary (tokenizer_import.py's byte-level BPE, spm_import.py's SentencePiece): BOS and EOS as
tokenizer_config.json names them, the token a post-processor puts first, the chat template, and the
ids that end a generation.
"""

from __future__ import annotations

from tinygen.errors import TinygenError

# Tokens that end a turn or a text, found by name as llama.cpp does: a model's EOS is often not the
# only one (SmolLM2-Instruct ends turns with <|im_end|> but texts with <|endoftext|>).
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>",
              "<end_of_turn>", "<EOT>")


def hf_token_id(token, special: dict[str, int], vocab: dict[str, int], key: str) -> int | None:
    """The id of a tokenizer_config.json token, written as a string or as an AddedToken object."""
    text = token.get("content") if isinstance(token, dict) else token
    if text is None:
        return None
    token_id = special.get(text, vocab.get(text)) if isinstance(text, str) else None
    if token_id is None:
        raise TinygenError(f"tokenizer_config.json: {key} {text!r} is not in the vocabulary")
    return token_id


def leading_special(post: dict | None, special: dict[str, int]) -> int | None:
    """The id of the token a TemplateProcessing post-processor puts first (Llama 3's BOS), if any."""
    steps = post.get("processors") if isinstance(post, dict) and post.get("type") == "Sequence" else [post]
    for step in steps or ():
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0]
            if isinstance(first, dict) and "SpecialToken" in first:
                return special.get(first["SpecialToken"].get("id"))
    return None


def hf_chat_template(config: dict) -> str | None:
    """tokenizer_config.json's chat template: the one given, or the default of several named ones."""
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one is for chat
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) else None


def stop_ids(ids: tuple[int | None, ...], special: dict[str, int], names: tuple[str, ...] = END_TOKENS) -> list[int]:
    """The model's own EOS and end-of-turn ids, then the special tokens named like one."""
    named = (special[t] for t in names if t in special)
    return list(dict.fromkeys(i for i in (*ids, *named) if i is not None))

