"""Chat templates tinygen knows by heart, for model files that came without the one their model was
tuned on. A GGUF converted by a tool that drops it has no `tokenizer.chat_template`; llama.cpp then
falls back on ChatML, whose <|im_start|> a Gemma vocabulary does not even hold. A known template is
used only where the architecture, the vocabulary's turn markers and the model's name (an "it" or
"instruct" in it) all say whose tuned model it is: a base model holds the same vocabulary and never
learned the turns, so it keeps the plain transcript. The template is read like a file's own
(formats/jinja's from_jinja), so it is checked by rendering as theirs are.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

# Gemma 3's template, as google/gemma-3-270m-it and the other gemma-3-*-it write it in
# tokenizer_config.json: the system text opens the first user turn, the assistant is "model".
GEMMA3 = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


# Words in a model's name that mark it instruction-tuned, as Google and the GGUF converters name them
# (gemma-3-270m-it, general.finetune "it").
TUNED = frozenset({"it", "instruct"})


@dataclass(frozen=True)
class KnownTemplate:
    name: str
    family: str  # the architecture (ModelConfig.family) it was written for
    markers: tuple[str, ...]  # tokens its turns are written with, which the vocabulary must hold
    source: str  # Jinja, as the model's own tokenizer_config.json has it

    @property
    def note(self) -> str:
        return (f"no chat template came with the model: using {self.name}'s, as its architecture, its "
                f"{' and '.join(self.markers)} tokens and its name say it is an instruction-tuned {self.name}")


KNOWN = (KnownTemplate("Gemma 3", "gemma3", ("<start_of_turn>", "<end_of_turn>"), GEMMA3),)


def known_template(family: str, vocabulary: Collection[str], names: Iterable[object]) -> KnownTemplate | None:
    """The template that an instruction-tuned model of this family, whose vocabulary holds its turn
    markers, was tuned on; `names` are what the model is called (a GGUF's general.name and
    general.finetune, its file or folder name). None otherwise: such a model is left without a
    template (a plain transcript in chat)."""
    words = {w for n in names if isinstance(n, str) for w in re.split(r"[^a-z0-9]+", n.lower())}
    if not words & TUNED:
        return None
    return next((t for t in KNOWN if t.family == family and all(m in vocabulary for m in t.markers)), None)
