"""Imported models everywhere: `eval`, `train --init`, `tokenize`, `attention` and `sample --explain`
on a GGUF and a Hugging Face folder built here with random weights, each through the model's own
tokenizer. The GGUF is Llama 3 style (BOS before every text, no <|endoftext|>); the folder's
vocabulary has <|endoftext|> and no BOS. Scoring's memory bounds (chunked head, --ctx,
--batch-size) are checked against plain computations."""

from __future__ import annotations

import json
import math
import unicodedata

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import STORY_LINES, ForkServer, assert_ok
from modelfiles import (
    gguf_tokenizer_fields,
    tiny_llama,
    transformers_llama,
    write_gguf,
    write_gpt2_files,
)

from tinygen.core import evaluate
from tinygen.core.checkpoint import load_model
from tinygen.core.evaluate import document_start, score_tokens
from tinygen.core.tokenizer import EOT, Tokenizer
from tinygen.errors import TinygenError
from tinygen.formats.tokenizer_import import tokenizer_from_gguf
from tinygen.generate.engine import stream
from tinygen.generate.sampling import SamplingParams
from tinygen.generate.textgen import prompt_ids
from tinygen.inspect.explain import surprisal
from tinygen.training.data import encode_documents, read_documents

TEXT = "Once upon a time, Spot ran to the park."
DOCS = ["Once upon a time, there was a little dog named Spot.", "They played all day and were very happy."]
# A Llama 3 style vocabulary's special tokens and chat template: BOS opens every text and chat.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def write_llama3_gguf(path, tok: Tokenizer, block: int):
    """A tiny Llama 3 style GGUF on tok's tokens: BOS first (llama-bpe), EOS <|eot_id|>, no
    <|endoftext|>. The special tokens' head rows are zero, so that greedy text never ends early."""
    n = len(tok.ranks)
    meta = gguf_tokenizer_fields(tok.ranks, LLAMA3_SPECIALS, pre="llama-bpe", chat_template=LLAMA3_TEMPLATE,
                                 **{"ggml.eos_token_id": n + LLAMA3_SPECIALS.index("<|eot_id|>")})
    config, state = tiny_llama(n_layer=2, d=64, n_head=4, n_kv=2, ff=128, vocab=n + len(LLAMA3_SPECIALS), tied=False)
    config["max_position_embeddings"] = block
    for name, w in state.items():  # sharper logits: greedy choices far from ties
        if w.dim() == 2:
            w.mul_(3.0)
    return write_gguf(path, config, state, meta=meta, quiet_ids=range(n, n + len(LLAMA3_SPECIALS)))


@pytest.fixture(scope="module")
def cli():
    server = ForkServer(preload=("gguf", "pydantic"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """{"gguf": path, "hf": path}: the Llama 3 style GGUF, and a Hugging Face Llama folder saved by
    transformers with a GPT-2 style tokenizer.json (<|endoftext|> last)."""
    import transformers

    folder = tmp_path_factory.mktemp("imported")
    gguf_path = write_llama3_gguf(folder / "llama3.gguf", tokenizer, block=64)
    hf = folder / "hf-llama"
    model = transformers_llama("llama", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
                                         "max_position_embeddings": 64, "tie_word_embeddings": False,
                                         "vocab_size": len(tokenizer.ranks) + 1})
    model.save_pretrained(hf)
    spelled = write_gpt2_files(folder / "gpt2-files", tokenizer.ranks)
    transformers.GPT2TokenizerFast.from_pretrained(spelled).save_pretrained(hf)
    return {"gguf": gguf_path, "hf": hf}


@pytest.fixture(scope="module", params=["gguf", "hf"])
def imported(request, models):
    path = models[request.param]
    net, tok, _ = load_model(path)
    return path, net, tok


def test_the_two_vocabularies_start_documents_their_own_way(models):
    _, gguf_tok, _ = load_model(models["gguf"])
    _, hf_tok, _ = load_model(models["hf"])
    assert gguf_tok.eot_id is None and gguf_tok.add_bos and document_start(gguf_tok) == gguf_tok.bos_id
    assert not hf_tok.add_bos and document_start(hf_tok) == hf_tok.special[EOT]


# -- tokenize ---------------------------------------------------------------------------------------


def test_tokenize_shows_the_models_own_ids(cli, imported):
    path, _, tok = imported
    r = cli("tokenize", "-m", path, "--ids", TEXT)
    assert_ok(r)
    assert [int(i) for i in r.out.split()] == tok.encode(TEXT)
    assert cli("tokenize", "-m", path, "--count", TEXT).out == f"{len(tok.encode(TEXT))}\n"


def test_tokenize_probs_predicts_the_first_token_from_the_document_start(cli, imported):
    path, net, tok = imported
    r = cli("tokenize", "--probs", "-m", path, TEXT)
    assert_ok(r)
    rows = [line.split("\t") for line in r.out.splitlines()]
    want = surprisal(net, tok.encode(TEXT), document_start(tok))
    assert [int(row[0]) for row in rows] == tok.encode(TEXT) and want.scored == len(rows)  # the first one too
    for row, p in zip(rows, want.probs):
        assert math.isclose(float(row[2]), p, rel_tol=1e-4)


# -- eval -------------------------------------------------------------------------------------------


@pytest.fixture
def docs_file(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text(f"\n{EOT}\n".join(DOCS))
    return path


def test_eval_loss_is_the_direct_computation(cli, imported, docs_file):
    path, net, tok = imported
    r = cli("eval", "-m", path, docs_file, "--json")
    assert_ok(r)
    got = json.loads(r.out)
    start = document_start(tok)
    ids = [i for doc in DOCS for i in [start, *tok.encode(doc, special=False)]]
    assert len(ids) <= net.config.block_size  # one window: the loss is one plain forward pass
    with torch.no_grad():
        logits = net(torch.tensor([ids[:-1]]))[0]
    want = F.cross_entropy(logits, torch.tensor(ids[1:])).item()
    assert got["tokens"] == len(ids) - 1 and got["context"] == net.config.block_size
    assert math.isclose(got["loss"], want, rel_tol=1e-5)


def test_eval_with_a_shorter_context_and_batch(cli, imported, docs_file):
    path, net, tok = imported
    r = cli("eval", "-m", path, docs_file, "--json", "--ctx", "8", "--batch-size", "1")
    assert_ok(r)
    got = json.loads(r.out)
    tokens = encode_documents(read_documents([docs_file]), tok)
    want = score_tokens(net, tokens, context=8)
    assert got["context"] == 8 and math.isclose(got["loss"], want.loss, rel_tol=1e-6)
    assert not math.isclose(want.loss, score_tokens(net, tokens).loss, rel_tol=1e-3)  # the window mattered
    for flags, needle in ((["--ctx", "65"], "--ctx must be at most the model's context, 64"),
                          (["--ctx", "8", "--stride", "9"], "--stride must be at most the scoring window, 8 tokens")):
        bad = cli("eval", "-m", path, docs_file, *flags)
        assert bad.rc == 1 and bad.raw == b"" and "Traceback" not in bad.err
        assert bad.err.splitlines()[-1] == f"error: {needle}"


# -- attention and sample --explain ------------------------------------------------------------------


def test_attention_reads_the_prompt_as_the_model_does(cli, imported):
    path, net, tok = imported
    r = cli("attention", "-m", path, TEXT, "--json")
    assert_ok(r)
    got = json.loads(r.out)
    ids = prompt_ids(tok, TEXT)
    assert got["ids"] == ids and (ids[0] == tok.bos_id) == tok.add_bos
    weights = torch.tensor(got["attention"])
    assert weights.shape == (net.config.n_layer, net.config.n_head, len(ids), len(ids))
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-4, rtol=0)
    assert torch.all(weights.triu(1) == 0)  # nothing attends ahead


def test_sample_explain_steps_are_the_greedy_tokens(cli, imported):
    path, net, tok = imported
    r = cli("sample", "-m", path, TEXT, "--explain", "--jsonl", "-n", "5", "-t", "0")
    assert_ok(r)
    steps = [json.loads(line) for line in r.out.splitlines()]
    want = list(stream(net, prompt_ids(tok, TEXT), SamplingParams(temperature=0), 5, stop_ids=tok.stop_ids))
    assert [s["chosen"] for s in steps] == want and len(want) == 5
    assert all(s["text"] == tok.label(s["chosen"]) for s in steps)


# -- train --init -------------------------------------------------------------------------------------


def test_train_init_fine_tunes_and_keeps_the_imported_tokenizer(cli, imported, tmp_path):
    path, net, tok = imported
    corpus = tmp_path / "stories.txt"
    corpus.write_text(f"\n{EOT}\n".join(STORY_LINES * 6))
    out = tmp_path / "tuned.safetensors"
    r = cli("train", corpus, "--init", path, "--out", out, "--max-steps", "3", "--batch-size", "2",
            "--block-size", "32", "--eval-every", "3", "--warmup-steps", "1", timeout=300)
    assert_ok(r)
    tuned, tuned_tok, info = load_model(out)
    assert tuned_tok.to_dict() == tok.to_dict()  # the imported tokenizer travels with the weights
    assert tuned.config.vocab_size == net.config.vocab_size and info.provenance["steps"] == 3
    assert math.isfinite(info.provenance["val_loss"])
    before = dict(net.named_parameters())
    assert any(not torch.equal(w, before[name]) for name, w in tuned.named_parameters())  # it trained


# -- documents through the model's own tokenizer -----------------------------------------------------


def test_documents_are_normalized_as_the_tokenizer_does(tokenizer):
    """A Qwen2 style vocabulary normalizes to NFC before splitting; tiktoken alone would not."""
    fields = gguf_tokenizer_fields(tokenizer.ranks, [EOT], pre="qwen2")
    tok = tokenizer_from_gguf({k: v for k, v in fields.items() if v is not None})
    docs = ["Cafe\u0301 nai\u0308ve", "Spot ran."]
    got = encode_documents(docs, tok).tolist()
    assert got == [i for d in docs for i in [tok.special[EOT], *tok.encode(d, special=False)]]
    assert got[1:1 + len(tok.encode("Café naïve"))] == tok.encode(unicodedata.normalize("NFC", docs[0]))
    assert got != [i for d in docs for i in [tok.special[EOT], *tok.enc.encode_ordinary(d)]]


def test_documents_drop_bytes_the_vocabulary_lacks(tokenizer):
    """A vocabulary without the byte 0x04 (as SmolLM2's) never yields an id past itself."""
    ranks = [r for r in tokenizer.ranks if r != b"\x04"]
    fields = gguf_tokenizer_fields(ranks, [EOT], pre="gpt-2")
    tok = tokenizer_from_gguf({k: v for k, v in fields.items() if v is not None})
    assert tok.drop_unknown_bytes
    got = encode_documents(["Spot\x04 ran."], tok)
    assert got.max() < tok.n_vocab and got.tolist() == [tok.special[EOT], *tok.encode("Spot\x04 ran.")]


def test_a_vocabulary_without_any_start_is_refused(tokenizer):
    bare = Tokenizer(tokenizer.ranks, tokenizer.pattern, {})
    with pytest.raises(TinygenError, match="BOS, EOS or <\\|endoftext\\|>"):
        encode_documents(["Spot ran."], bare)


# -- scoring memory: the head in chunks ------------------------------------------------------------


def test_chunked_scoring_equals_one_pass(imported, monkeypatch):
    _, net, tok = imported
    tokens = np.array(encode_documents(STORY_LINES * 4, tok), dtype=np.int64)
    whole = evaluate.token_losses(net, tokens, stride=16)
    monkeypatch.setattr(evaluate, "HEAD_CHUNK_BYTES", 4 * net.config.vocab_size * 3)  # three rows of logits at a time
    chunked = evaluate.token_losses(net, tokens, stride=16, batch_size=3)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and both are what the full (B, T, V) logits give
        x = torch.from_numpy(tokens[:65][None])
        full = F.cross_entropy(net(x[:, :-1])[0], x[0, 1:], reduction="none").double().numpy()
    np.testing.assert_allclose(whole[:64], full, rtol=1e-5, atol=1e-6)
