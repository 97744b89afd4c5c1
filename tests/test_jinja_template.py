"""Jinja chat templates: SmolLM2's renders exactly what transformers' apply_chat_template renders,
broken or hostile templates are one-line errors, and jinja2 stays unimported until a render."""

import subprocess
import sys
from pathlib import Path

import pytest

from tinygen.formats.jinja import JinjaChatTemplate
from tinygen.errors import TinygenError

SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct"
SMOLLM2_GGUF = SMOLLM2 / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time..."},
     {"role": "user", "content": "Go on, with émojis 😀\nand\tnewlines."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  spaces  "}],
]


@pytest.fixture(scope="module")
def smollm2():
    """(our template from the GGUF's metadata, transformers' tokenizer from the same file)."""
    if not SMOLLM2_GGUF.exists():
        pytest.skip("../shared/models/smollm2-135m-instruct is absent")
    gguf = pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    fields = gguf.GGUFReader(SMOLLM2_GGUF).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    ours = JinjaChatTemplate(fields["tokenizer.chat_template"].contents(),
                             bos_token=tokens[fields["tokenizer.ggml.bos_token_id"].contents()],
                             eos_token=tokens[fields["tokenizer.ggml.eos_token_id"].contents()])
    hf = transformers.AutoTokenizer.from_pretrained(SMOLLM2, gguf_file=SMOLLM2_GGUF.name)
    return ours, hf


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "system", "multi-turn", "empty-system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_renders_as_transformers(smollm2, conversation, add_generation_prompt):
    ours, hf = smollm2
    expected = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.render(conversation, add_generation_prompt=add_generation_prompt) == expected


def test_smollm2_description_and_default_system_prompt(smollm2):
    ours, _ = smollm2
    assert ours.name == "ChatML"
    assert ours.first_line.startswith("{% for message in messages %}")
    assert ours.default_system_prompt == SMOLLM2_SYSTEM
    assert ours.render([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_transformers_conventions():
    """What transformers' environment adds to plain jinja2: trimmed blocks, the token variables,
    a tojson that keeps non-ASCII, strftime_now, loop controls and the {% generation %} tag."""
    source = ("{{ bos_token }}{% for m in messages %}\n"
              "  {% if m.role == 'skip' %}{% continue %}{% endif %}\n"
              "{% generation %}{{ m | tojson }}{% endgeneration %}\n"
              "{% endfor %}{{ eos_token }}{{ strftime_now('%Y')[:2] }}")
    conversation = [{"role": "user", "content": "héllo <b>", "name": None}, {"role": "skip", "content": "x"}]
    out = JinjaChatTemplate(source, bos_token="<s>", eos_token="</s>").render(conversation)
    assert out == '<s>{"role": "user", "content": "héllo <b>"}</s>20'
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    expected, _ = chat_template_utils.render_jinja_template(
        conversations=[[{k: v for k, v in m.items() if v is not None} for m in conversation]],
        chat_template=source, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert [out] == expected


def test_templates_without_a_default_system_prompt():
    plain = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    assert JinjaChatTemplate(plain).default_system_prompt is None
    assert JinjaChatTemplate(plain).name == "custom"
    refuses = "{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ messages }}"
    assert JinjaChatTemplate(refuses).default_system_prompt is None


@pytest.mark.parametrize("source,needle", [
    ("{% if messages %}", "syntax error on line 1"),
    ("{% for %}", "syntax error"),
    ("{{ raise_exception('System role not supported') }}", "System role not supported"),
    ("{{ messages[0]['content'] + 1 }}", "failed"),
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{{ messages.__class__.__subclasses__() }}", "unsafe"),
    ("{% set x = [] %}{{ x.append(1) }}", "unsafe"),  # the immutable sandbox: no mutation either
], ids=["unclosed", "bad-for", "raises", "type-error", "mro", "subclasses", "mutation"])
def test_template_errors_are_one_line(source, needle):
    with pytest.raises(TinygenError, match=needle) as e:
        JinjaChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)


def test_messages_must_be_objects():
    with pytest.raises(TinygenError, match="list of messages"):
        JinjaChatTemplate("{{ messages }}").render(["hi"])


def test_jinja2_is_imported_only_to_render():
    code = ("import sys; from tinygen.formats.jinja import JinjaChatTemplate as T; "
            "t = T('{{ messages[0].content }}'); t.name; assert 'jinja2' not in sys.modules; "
            "assert t.render([{'role': 'user', 'content': 'ok'}]) == 'ok'; assert 'jinja2' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
