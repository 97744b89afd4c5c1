"""Structured output (generate/constrain.py): a JSON schema, a regex, a choice or a grammar, enforced
token by token. Every complete output satisfies its constraint, checked by jsonschema and `re`
rather than by llguidance itself, over hundreds of samples at temperature 1 on the bundled model,
SmolLM2 (../shared, skipped when absent) and random weights; no special token ever enters the text;
a constrained row decodes as it would alone, and greedy takes the best allowed token; every
vocabulary kind works (tinygen's BPE, one that normalizes to NFC, GPT-2's, SmolLM2's, SentencePiece
with and without its space prefix); and the command line refuses a bad constraint in one line and
marks what is incomplete."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_ok, assert_one_line_error, make_model

from tinygen.core.checkpoint import (
    DEFAULT_CHAT_MODEL,
    default_model_path,
    load_model,
    save_checkpoint,
)
from tinygen.core.config import ModelConfig
from tinygen.core.tokenizer import Tokenizer
from tinygen.generate import engine
from tinygen.generate.constrain import Constraint, Guide
from tinygen.generate.sampling import SamplingParams
from tinygen.generate.textgen import Request, TextGenerator

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm2 = pytest.mark.skipif(not SMOLLM2.exists(), reason="no SmolLM2 GGUF in ../shared/models")
BUNDLED = default_model_path()
BUNDLED_CHAT = default_model_path(DEFAULT_CHAT_MODEL)

# Nested objects, an array, enums, required fields, bounded numbers and patterned strings. Every
# string has a bounded length and the one fractional number steps by 0.5, so a finished text is
# never more than a few dozen tokens away; a bare "number" lets a model write digits without end.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]+$", "maxLength": 8},
        "age": {"type": "integer", "minimum": 1, "maximum": 99},
        "size": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.5},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "home": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                  "floor": {"type": "integer", "minimum": -2, "maximum": 9}},
                 "required": ["zip", "floor"], "additionalProperties": False},
    },
    "required": ["name", "age", "size", "home"],
    "additionalProperties": False,
}
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
ANSWERS = ["yes", "no", "maybe"]
JSON, REGEX, CHOICE = Constraint.json_schema(PERSON), Constraint("regex", DATE), Constraint.choice(ANSWERS)
LIST = Constraint("grammar", 'start: "(" item ("," item)~0..3 ")"\nitem: /[0-9]{1,2}/')  # Lark
BRACKETS = Constraint("grammar", 'root ::= "[" [a-c]{1,6} "]"')  # GBNF
SENTENCE = Constraint("regex", r"[A-Z][a-z]{0,6}( [a-z]{1,6}){0,3}\.")
# The grammars as Python regexes, to check their texts without llguidance.
GRAMMAR_AS_REGEX = {LIST: r"\([0-9]{1,2}(,[0-9]{1,2}){0,3}\)", BRACKETS: r"\[[a-c]{1,6}\]"}
PROMPTS = {JSON: "A person, as JSON:", REGEX: "A date:", CHOICE: "Answer yes or no:"}
HOT = SamplingParams(temperature=1.0)
GREEDY = SamplingParams(temperature=0)


def violation(constraint: Constraint, text: str) -> str | None:
    """Why text does not satisfy the constraint, checked without llguidance; None when it does."""
    if constraint.kind == "grammar":
        return None if re.fullmatch(GRAMMAR_AS_REGEX[constraint], text) else "does not match the grammar"
    if constraint.kind == "json_schema":
        try:
            value = json.loads(text)
        except ValueError as e:
            return f"not JSON: {e}"
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(json.loads(constraint.source))
                                                 .iter_errors(value))
        if error is not None:
            return error.message
        # Spaced as json.dumps spaces it, with no whitespace of the model's own (JSON_STYLE).
        skeleton = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text).replace(", ", ",").replace(": ", ":")
        return "whitespace outside the strings" if re.search(r"\s", skeleton) else None
    if constraint.kind == "regex":
        return None if re.fullmatch(constraint.source, text) else "no full match"
    if constraint.kind == "choice":
        return None if text in json.loads(constraint.source) else "not one of the choices"
    raise AssertionError(f"no check for {constraint.kind}")


def assert_sound(constraint: Constraint, completion, max_new_tokens: int) -> None:
    """A complete text satisfies its constraint and ended there; an incomplete one says so and ran
    out of tokens or could not go on."""
    __tracebackhide__ = True
    assert completion.complete in (True, False), completion
    if completion.complete:
        why = violation(constraint, completion.text)
        assert why is None, f"{completion.text!r} is marked complete but {why}"
        assert completion.finish_reason == "stop", completion
    elif completion.finish_reason == "length":
        assert completion.n_tokens == max_new_tokens, completion
    else:
        assert completion.finish_reason == "stop" and completion.n_tokens < max_new_tokens, completion


def textgen_of(path: Path) -> TextGenerator:
    if not path.exists():
        pytest.skip(f"no {path.name}")
    model, tokenizer, _ = load_model(path)
    return TextGenerator(model, tokenizer)


@pytest.fixture(scope="module")
def smollm2():
    return textgen_of(SMOLLM2)


@pytest.fixture(scope="module")
def bundled():
    return textgen_of(BUNDLED)


@pytest.fixture(scope="module")
def random_textgen(model_path):
    model, tokenizer, _ = load_model(model_path)
    return TextGenerator(model, tokenizer)


# -- every complete output is valid ------------------------------------------------------------------

# model: (JSON, regex, choice samples; max_new_tokens; the share that must complete). A person takes
# about 80 tokens in the small BPEs (a character or two each) and about 50 in SmolLM2's (a digit
# each), which also costs the most per token: it gets fewer of them, so that its part stays short.
VALIDITY = {"bundled": ((80, 60, 60), 160, 0.95), "smollm2": ((32, 80, 88), 80, 0.95),
            "random": ((80, 60, 60), 160, 0.9)}


@pytest.mark.parametrize("name", list(VALIDITY))
def test_every_complete_sample_validates(name, request):
    """200 seeded samples at temperature 1, batched 16 at a time with the three constraints mixed:
    each complete text passes jsonschema, re.fullmatch or membership; each incomplete one is marked
    so with its reason; and most complete (the limits leave room for what these models write)."""
    textgen = request.getfixturevalue({"random": "random_textgen"}.get(name, name))
    (n_json, n_regex, n_choice), limit, share = VALIDITY[name]
    kinds = [JSON] * n_json + [REGEX] * n_regex + [CHOICE] * n_choice
    kinds = [kinds[i] for i in np.random.default_rng(0).permutation(len(kinds))]  # mixed in every batch
    requests = [Request(PROMPTS[c], HOT, limit, seed=i, constraint=c) for i, c in enumerate(kinds)]
    results = dict(textgen.batch(requests, 16))
    assert sorted(results) == list(range(200))
    for i, c in results.items():
        assert_sound(kinds[i], c, limit)
    complete = {k: sum(bool(results[i].complete) for i in range(200) if kinds[i] == k) for k in (JSON, REGEX, CHOICE)}
    assert complete[REGEX] == n_regex and complete[CHOICE] == n_choice, complete  # a few tokens each
    assert sum(complete.values()) >= share * 200, complete
    texts = {results[i].text for i in range(200) if kinds[i] == JSON and results[i].complete}
    assert len(texts) > n_json // 2  # sampled, not one text over and over


# -- special tokens ----------------------------------------------------------------------------------------


def special_loving(model, tokenizer, boost: float = 30.0):
    """The model, with every special token's logit raised far above the rest: whenever a mask lets
    one through, it is drawn."""
    bias = torch.zeros(model.config.vocab_size)
    bias[sorted(tokenizer.special_ids)] = boost
    head = model.head
    model.head = lambda h: head(h) + bias
    return model


MIXED = [Constraint("regex", "[a-z ]{1,12}"), Constraint.choice(["yes", "no", "nothing"]),
         Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999}},
                                 "required": ["a"], "additionalProperties": False}), LIST]


def spm_tokenizer(add_dummy_prefix: bool):
    """A SentencePiece vocabulary (byte fallback, control and user-defined pieces), as test_sentencepiece
    trains one and a GGUF's fields give it."""
    pytest.importorskip("sentencepiece")
    from test_sentencepiece import gguf_fields, train

    from tinygen.formats.tokenizer_import import tokenizer_from_gguf

    return tokenizer_from_gguf(gguf_fields(train(add_dummy_prefix=add_dummy_prefix), add_dummy_prefix))


def vocabulary(kind: str, tokenizer):
    if kind == "tinygen":
        return tokenizer
    if kind == "smollm2":
        if not SMOLLM2.exists():
            pytest.skip("no SmolLM2 GGUF in ../shared/models")
        from tinygen.core.checkpoint import load_tokenizer

        return load_tokenizer(SMOLLM2)
    return spm_tokenizer(kind == "spm-space-prefix")


@pytest.mark.parametrize("kind", ["tinygen", "spm-space-prefix", "smollm2"])
def test_no_special_token_inside_a_constrained_text(kind, tokenizer):
    """On a model that prefers special tokens to everything else, constrained rows never draw one:
    not with the end-of-text ids as stop ids (a row then ends, complete, as soon as its text may),
    nor with some of them, nor with none (the mask alone keeps them out)."""
    tok = vocabulary(kind, tokenizer)
    config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=tok.n_vocab)
    model = special_loving(make_model(config, scale=3.0), tok)
    guide = Guide(tok)
    constraints = MIXED * 4
    prompt = tok.encode("Once upon a time")
    for stops in (tok.stop_ids, tok.stop_ids[1:], ()):
        outs = engine.generate_batch(model, [prompt] * len(constraints), HOT, 24, stop_ids=stops,
                                     seeds=list(range(len(constraints))),
                                     constraints=[lambda c=c: guide.matcher(c) for c in constraints])
        for c, ids in zip(constraints, outs):
            assert ids and not set(ids) & tok.special_ids, (stops, c, ids)
            if stops == tok.stop_ids:
                # The stop was the likeliest token all along, so it came as soon as it was allowed:
                # at the first moment the text was complete, never before.
                text = b"".join(map(tok.token_bytes, ids)).decode()
                assert len(ids) < 24 and violation(c, text) is None, (c, text)
    # Unconstrained rows of this model do draw them: the check above has teeth.
    free = engine.generate_batch(model, [prompt], HOT, 4, seeds=[0])[0]
    assert set(free) & tok.special_ids


# -- a row decodes as it would alone ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rope_model(rope_config):
    return make_model(rope_config, seed=5, scale=3.0)


def test_a_constrained_row_does_not_depend_on_its_neighbours(rope_model, tokenizer):
    """The same constrained request gives the same tokens alone and in any slot of a batch of 1, 3 or
    16 rows beside other constraints, unconstrained rows, other settings and limits."""
    guide = Guide(tokenizer)
    target = (tokenizer.encode("Spot liked"), HOT, 120, 7, JSON)
    others = [(tokenizer.encode("The sun"), HOT, 40, 1, REGEX), ([5], SamplingParams(temperature=0.8, top_k=20), 30, 2, None),
              (tokenizer.encode("Tom"), SamplingParams(temperature=1.2, repetition_penalty=1.3), 9, 3, CHOICE),
              (tokenizer.encode("One day"), GREEDY, 50, 4, JSON), (tokenizer.encode("They"), HOT, 3, 5, None),
              (tokenizer.encode("Lily"), SamplingParams(temperature=1.0, top_p=0.9), 25, 6, LIST)]

    def run(rows, batch_size):
        prompts, params, limits, seeds, constraints = zip(*rows)
        return engine.generate_batch(rope_model, list(prompts), list(params), list(limits), seeds=list(seeds),
                                     stop_ids=tokenizer.stop_ids, batch_size=batch_size,
                                     constraints=[c and (lambda c=c: guide.matcher(c)) for c in constraints])

    alone = run([target], 1)[0]
    assert len(alone) > 5
    for batch_size, crowd in ((1, others), (3, others), (16, others * 3)):  # 16 fills up and refills slots
        for at in (0, 2, len(crowd)):
            rows = crowd[:at] + [target] + crowd[at:]
            assert run(rows, batch_size)[at] == alone, (batch_size, at)
    # The neighbours themselves are those they are alone too.
    together = run(others, 3)
    assert together == [run([o], 1)[0] for o in others]


def allowed_ids(guide: Guide, constraint: Constraint, ids: list[int], stop_ids) -> tuple[torch.Tensor, bool]:
    """What may follow ids under the constraint, read from a fresh llguidance matcher of its own: the
    tokens it allows, and the stop ids once the text is complete; and whether the text is finished."""
    matcher = llguidance.LLMatcher(guide.lltokenizer, guide.check(constraint), log_level=0)
    assert matcher.consume_tokens(ids), matcher.get_error()
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    allowed = bits[:guide.tokenizer.n_vocab].astype(bool)
    allowed[list(stop_ids)] = matcher.is_accepting()
    allowed[[i for i in guide.tokenizer.special_ids if i not in stop_ids]] = False
    return torch.from_numpy(allowed), matcher.is_stopped()


@pytest.mark.parametrize("constraint", [JSON, REGEX, CHOICE, LIST], ids=["json", "date", "choice", "grammar"])
def test_greedy_takes_the_best_allowed_token(rope_model, tokenizer, constraint):
    """Under a constraint, greedy decoding takes, at every step, the token of highest logit among
    those the constraint allows: the model's own logits (full recompute, no cache) masked by hand."""
    guide = Guide(tokenizer)
    prompt = tokenizer.encode("Once upon a time")
    out = engine.generate_batch(rope_model, [prompt], GREEDY, 40, stop_ids=tokenizer.stop_ids,
                                constraints=[lambda: guide.matcher(constraint)])[0]
    assert out
    masked_out = 0  # steps at which the model's own favourite was not allowed
    with torch.no_grad():
        for n in range(len(out) + 1):
            logits = rope_model(torch.tensor([prompt + out[:n]]))[0, -1]
            allowed, stopped = allowed_ids(guide, constraint, out[:n], tokenizer.stop_ids)
            if n == len(out):  # the row ended: out of tokens, finished, or greedy took a stop id
                assert n == 40 or stopped or int(logits.masked_fill(~allowed, float("-inf")).argmax()) in tokenizer.stop_ids
                break
            best = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            assert out[n] == best, (n, tokenizer.decode(out[:n]))
            masked_out += not allowed[int(logits.argmax())]
    assert masked_out  # the constraint changed what greedy would have taken


# -- every vocabulary kind ---------------------------------------------------------------------------------

# Forced bytes at the start (SentencePiece's space prefix once made the first forced token a space),
# a choice of texts that start with a space, texts beyond ASCII and decomposed accents (which NFC once
# turned into other forced bytes), a grammar in Lark and in GBNF.
VOCABULARY_CONSTRAINTS = [
    (JSON, 160), (REGEX, 16), (Constraint.choice([" no", "café", "日本語", "yes, sir"]), 12),
    (Constraint("regex", "e\u0301t(e\u0301|ait)"), 12), (SENTENCE, 40), (LIST, 24), (BRACKETS, 12),
]


@pytest.fixture(params=["tinygen", "nfc", "gpt2-files", "hf-gpt2", "spm-space-prefix", "spm", "smollm2"])
def any_vocabulary(request, tokenizer):
    """(model, tokenizer) of every vocabulary kind: random weights, but SmolLM2's own model."""
    kind = request.param
    if kind == "smollm2":
        textgen = request.getfixturevalue("smollm2")
        return textgen.model, textgen.tokenizer, 2  # test_every_complete_sample_validates samples it more
    if kind == "hf-gpt2":
        model, tok, _ = load_model(request.getfixturevalue("hf_gpt2_dir"))
        return model, tok, 6
    if kind == "gpt2-files":
        folder = request.getfixturevalue("gpt2_files")
        tok = Tokenizer.from_gpt2_files(folder / "vocab.json", folder / "merges.txt")
    elif kind == "nfc":  # normalized before it is encoded, as Qwen2's is
        tok = Tokenizer(tokenizer.ranks, tokenizer.pattern, tokenizer.special, normalization="NFC")
    else:
        tok = vocabulary(kind, tokenizer)
    config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=256, vocab_size=tok.n_vocab)
    return make_model(config, seed=2, scale=2.0), tok, 6


def test_every_vocabulary_writes_valid_text(any_vocabulary):
    """Each constraint, sampled at temperature 1 with a few seeds, on each vocabulary: every complete
    text is valid, the short constraints all complete, and the long ones mostly do."""
    model, tok, n_seeds = any_vocabulary
    textgen = TextGenerator(model, tok)
    requests = [Request("The quick", HOT, limit, seed=seed, constraint=c)
                for c, limit in VOCABULARY_CONSTRAINTS for seed in range(n_seeds)]
    results = dict(textgen.batch(requests, 16))
    for i, r in enumerate(requests):
        c = results[i]
        assert c.complete in (True, False)
        if c.complete:
            why = violation(r.constraint, c.text)
            assert why is None, f"{c.text!r} is marked complete but {why}"
        elif r.constraint not in (JSON, SENTENCE):
            raise AssertionError(f"{r.constraint} did not complete in {r.max_new_tokens} tokens: {c}")
    assert sum(bool(c.complete) for c in results.values()) >= 0.8 * len(requests)


# -- the command line: errors ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("constraints")
    (folder / "person.json").write_text(json.dumps(PERSON))
    (folder / "bad.lark").write_text('start: "a" (\n')
    return folder


@pytest.mark.parametrize("flags, needles", [
    (["--json-schema", '{"type": "object",'], ["JSON schema is not valid JSON"]),
    (["--json-schema", '{"type": "frob"}'], ["invalid JSON constraint", "frob"]),
    (["--json-schema", '{"type": "string", "format": "frobnicate"}'], ["invalid JSON constraint", "frobnicate"]),
    (["--regex", r"[^\s\S]"], ["invalid regex constraint", "no text matches it"]),
    (["--regex", "a(b"], ["invalid regex constraint", "unclosed group"]),
    (["--grammar", "bad.lark"], ["invalid grammar"]),
    (["--grammar", "missing.lark"], ["no such file", "missing.lark"]),
    (["--json", "--regex", "a"], ["--json", "--regex"]),
    (["--choice", "a", "--stop", "x"], ["stop string", "choice"]),
], ids=["schema-json", "schema-type", "schema-format", "regex-nothing", "regex-syntax", "grammar-syntax",
        "grammar-file", "two-flags", "stop"])
def test_a_bad_constraint_is_one_line(cli, model_path, files, flags, needles):
    """Each mistake in a constraint is one `error:` line and exit 1, before anything is generated."""
    flags = [str(files / f) if f.endswith(".lark") else f for f in flags]
    assert_one_line_error(cli("sample", "-m", model_path, "Spot", *flags, "-n", "5"), *needles)


@pytest.mark.parametrize("line, needles", [
    ({"prompt": "x", "choice": "x"}, ["line 2", '"choice" must be a list']),
    ({"prompt": "x", "choice": ["a"], "regex": "a"}, ["line 2", "one constraint", '"regex"', '"choice"']),
    ({"prompt": "x", "regex": ""}, ["line 2", '"regex" must be a non-empty string']),
    ({"prompt": "x", "json_schema": "{nope"}, ["line 2", "not valid JSON"]),
    ({"prompt": "x", "json_schema": {"type": "frob"}}, ["request 2", "invalid JSON constraint"]),
    ({"prompt": "x", "response_format": {"type": "xml"}}, ["line 2", '"response_format" must be']),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {}}}, ["line 2", '"schema"']),
], ids=["choice-not-list", "two-constraints", "empty-regex", "schema-json", "schema-type", "format-type",
        "format-schema"])
def test_a_bad_jsonl_constraint_is_one_line_naming_the_row(cli, model_path, line, needles):
    """A bad constraint field in a JSON request is one `error:` line naming its line (or request, for
    what only llguidance finds), after a good first line; nothing is generated."""
    stdin = json.dumps({"prompt": "ok", "regex": "[a-z]+"}) + "\n" + json.dumps(line) + "\n"
    assert_one_line_error(cli("sample", "-m", model_path, "--jsonl", "-n", "4", input=stdin), *needles)


def test_chat_refuses_a_bad_constraint_in_one_line(cli, chat_model_path):
    assert_one_line_error(cli("chat", "-m", chat_model_path, "--regex", r"[^\s\S]", input="hi\n"), "no text matches")


@pytest.fixture(scope="module")
def without_byte_4(tmp_path_factory, tokenizer):
    """A model whose vocabulary has no token for byte 0x04, as SmolLM2's has none."""
    ranks = [r for r in tokenizer.ranks if r != b"\x04"]
    special = {name: i - 1 if i > tokenizer.ranks.index(b"\x04") else i for name, i in tokenizer.special.items()}
    tok = Tokenizer(ranks, tokenizer.pattern, special, drop_unknown_bytes=True)
    assert b"\x04" not in {tok.token_bytes(i) for i in range(tok.n_vocab)}
    path = tmp_path_factory.mktemp("no-byte") / "no-byte.safetensors"
    save_checkpoint(path, make_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64,
                                                 vocab_size=tok.n_vocab), scale=3.0), tok)
    return path, tok


def test_a_constraint_the_vocabulary_cannot_write_is_one_line(cli, without_byte_4):
    """A text that needs a byte the vocabulary lacks cannot be written: that is said as such, not as a
    constraint that matches nothing; one that may do without the byte works; one that needs the byte
    only later gets as far as it can, and ends there incomplete."""
    path, tok = without_byte_4
    assert_one_line_error(cli("sample", "-m", path, "Spot", "--regex", r"\x04", "-n", "3"),
                          "vocabulary cannot write", "regex")
    assert_one_line_error(cli("sample", "-m", path, "Spot", "--choice", "\x04", "-n", "3"), "vocabulary cannot write")
    r = cli("sample", "-m", path, "Spot", "--regex", r"\x04?a", "-n", "3")
    assert_ok(r)
    assert r.out == "a\n"
    Guide(tok).check(Constraint.json_schema({"const": "\x04"}))  # JSON writes it as \u0004, which it can
    stuck = cli("sample", "-m", path, "Spot", "--regex", r"a\x04", "-n", "5")
    assert stuck.text == "a"
    (warning,) = stuck.err.splitlines()
    assert warning == "warning: the output could not go on before its regex was complete"
    (row,) = rows_of(cli("sample", "-m", path, "Spot", "--regex", r"a\x04", "-n", "5", "--jsonl"))
    assert (row["completion"], row["tokens"], row["finish_reason"], row["complete"]) == ("a", 1, "stop", False)


@needs_smollm2
def test_smollm2_cannot_write_byte_4(cli):
    """SmolLM2's vocabulary has no 0x04: the one error line follows only the loader's notes."""
    r = cli("sample", "-m", SMOLLM2, "Hi", "--regex", r"\x04", "-n", "3", timeout=180)
    assert r.rc == 1 and r.raw == b"" and "Traceback" not in r.err, r.err
    *notes, last = r.err.splitlines()
    assert last.startswith("error: ") and "vocabulary cannot write" in last, r.err
    assert not any(line.startswith(("error", "warning")) for line in notes), r.err


# -- the command line: what it writes -----------------------------------------------------------------


def rows_of(r) -> list[dict]:
    assert_ok(r)
    return [json.loads(line) for line in r.out.splitlines()]


def test_jsonl_output_says_whether_the_text_is_complete(cli, model_path, files):
    """`sample --jsonl` adds "complete"; a row cut off by --max-new-tokens says "length" and false."""
    args = ("sample", "-m", model_path, "Spot", "--jsonl", "--json-schema", files / "person.json", "--seed", "3")
    (row,) = rows_of(cli(*args, "-n", "160"))
    assert row["complete"] is True and row["finish_reason"] == "stop"
    assert violation(JSON, row["completion"]) is None
    (cut,) = rows_of(cli(*args, "-n", "6"))
    assert cut == {"prompt": "Spot", "completion": cut["completion"], "tokens": 6, "finish_reason": "length",
                   "complete": False}
    assert row["completion"].startswith(cut["completion"])  # the same row, cut short
    (plain,) = rows_of(cli("sample", "-m", model_path, "Spot", "--jsonl", "-n", "6", "--seed", "3"))
    assert "complete" not in plain  # no constraint, nothing to say


def test_plain_output_warns_once_when_incomplete(cli, model_path, files):
    """Plain output: stdout is the text alone, and one `warning:` line on stderr says it is incomplete;
    a complete one has no warning. A batch names the output that fell short."""
    args = ("sample", "-m", model_path, "Spot", "--json-schema", files / "person.json", "--seed", "3")
    cut = cli(*args, "-n", "6")
    (row,) = rows_of(cli(*args, "-n", "6", "--jsonl"))
    assert cut.text == row["completion"]
    (warning,) = cut.err.splitlines()
    assert warning.startswith("warning: ") and "--max-new-tokens 6" in warning and "JSON" in warning, cut.err
    whole = cli(*args, "-n", "160")
    assert violation(JSON, whole.text) is None and whole.err == ""
    batch = cli("sample", "-m", model_path, "--input", "-", "--regex", DATE, "-n", "3", "--seed", "1", input="a\nb\n")
    assert_ok(batch)
    assert len(batch.out.splitlines()) == 2
    assert [line.split(" ran out")[0] for line in batch.err.splitlines()] == ["warning: output 1", "warning: output 2"]


def test_jsonl_rows_with_different_constraints_share_a_batch(cli, model_path):
    """Rows with a schema, a regex, a choice, a grammar, OpenAI's response_format forms and none decode
    together; each satisfies its own constraint and is what it is alone."""
    lines = [
        {"prompt": "Spot", "json_schema": PERSON, "max_new_tokens": 160},
        {"prompt": "The sun", "regex": DATE},
        {"prompt": "Tom", "max_new_tokens": 8},
        {"prompt": "Lily", "choice": ANSWERS},
        {"prompt": "One day", "grammar": LIST.source, "max_new_tokens": 40},
        {"prompt": "They", "response_format": {"type": "json_object"}, "max_new_tokens": 60},
        {"prompt": "Spot", "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
         "max_new_tokens": 160},
        {"prompt": "Tom", "response_format": {"type": "text"}, "max_new_tokens": 8},
    ]
    constraints = [JSON, REGEX, None, CHOICE, LIST, Constraint.json_schema({"type": "object"}), JSON, None]
    args = ("sample", "-m", model_path, "--jsonl", "--seed", "5", "--batch-size", "4", "-n", "30")
    stdin = "".join(json.dumps(x) + "\n" for x in lines)
    rows = rows_of(cli(*args, input=stdin))
    assert [r["prompt"] for r in rows] == [x["prompt"] for x in lines]
    for k, (row, c) in enumerate(zip(rows, constraints)):
        if c is None:
            assert "complete" not in row, row
        elif row["complete"]:
            assert violation(c, row["completion"]) is None, (c, row)
        else:  # any object at all: its keys and values may run on, and a small model's seldom end
            assert k == 5 and row["finish_reason"] == "length" and row["completion"].startswith("{"), row
    # Row i of the batch is seeded 5 + i: alone, with that seed, it writes the same.
    for i in (0, 1, 3, 7):
        alone = rows_of(cli(*args, input=json.dumps({**lines[i], "seed": 5 + i}) + "\n"))
        assert alone == [rows[i]], i


def test_choice_flags_and_json_flag(cli, model_path):
    """--choice (repeated) writes one of the choices; --json writes an object; --num-samples each valid."""
    r = cli("sample", "-m", model_path, "Tom", "--choice", "red ball", "--choice", "blue", "--num-samples", "4",
            "-t", "1.0", "--seed", "2", "--jsonl")
    rows = rows_of(r)
    assert len(rows) == 4 and all(row["complete"] for row in rows)
    assert {row["completion"] for row in rows} <= {"red ball", "blue"}
    r = cli("sample", "-m", model_path, "Tom", "--json", "-n", "40", "--seed", "1")
    assert isinstance(json.loads(r.text), dict) and r.err == ""


@pytest.mark.skipif(not BUNDLED_CHAT.exists(), reason="no bundled chat model in weights/")
def test_chat_replies_follow_a_schema(cli, files):
    """`chat --json-schema FILE --jsonl` with piped messages: each reply is the schema's JSON, marked
    complete; a reply cut short is marked incomplete and warned about."""
    schema = files / "answer.json"
    schema.write_text(json.dumps({"type": "object", "properties": {
        "answer": {"enum": ["yes", "no"]}, "mood": {"type": "string", "pattern": "^[a-z ]+$", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["answer", "count"],
        "additionalProperties": False}))
    r = cli("chat", "--json-schema", schema, "--jsonl", "--seed", "1", "-n", "60",
            input="Do you like dogs?\nHow many cats are there?\n")
    rows = rows_of(r)
    assert len(rows) == 2 and r.err == ""
    for row in rows:
        assert row["role"] == "assistant" and row["complete"] is True, row
        assert violation(Constraint.json_schema(schema.read_text()), row["content"]) is None, row
    r = cli("chat", "--json-schema", schema, "--jsonl", "--seed", "1", "-n", "3", input="Do you like dogs?\n")
    (row,) = rows_of(r)
    assert row["complete"] is False
    (warning,) = r.err.splitlines()
    assert warning.startswith("warning: the reply ran out of tokens"), r.err
