"""`tinygen export`: Hugging Face folders that transformers loads as tinygen runs them (logits,
greedy text, token ids, chat prompts), and llama GGUF files laid out as llama.cpp's converter lays
them out, which tinygen's own GGUF reader (and llama.cpp, where installed) loads back."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_ok, assert_one_line_error, make_model

from tinygen.core.checkpoint import default_model_path, load_model, save_checkpoint
from tinygen.core.config import ModelConfig
from tinygen.formats.export import export
from tinygen.generate.chat import ChatSession
from tinygen.generate.engine import generate_batch
from tinygen.generate.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

BUNDLED = default_model_path()
CHAT = default_model_path("chat.safetensors")
needs_bundled = pytest.mark.skipif(not BUNDLED.exists() or not CHAT.exists(), reason="weights/ is absent")

TEXTS = [
    "Once upon a time, there was a little dog named Spot.",
    "Café naïve – emoji 😀 and 日本語, Ελληνικά, עברית, ﬁ Ⅻ ٣.",
    "It's 1234567 o'clock; DON'T we'LL 3.14159 x2 1e-5 0x1F",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x >= 10 and y != 2: pass\r\n",
    "spaces   between\u00a0and\u3000odd\u2009ones\x0b\x0c\x85\u2028end   ",
    "\n\n\n  \n \t \r\n\r\n",
    "<|endoftext|>Hi<|user|>special <|end|>tokens<|assistant|><|system|>",
    "<|endoftext|", "",
]
PROMPT = "Once upon a time, there was a little"


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Short strings from an alphabet chosen to hit the split pattern's corners."""
    rng = random.Random(seed)
    pieces = list("aab  \n\t\r'sSdtT0123456789.,!?-_()[]{}<>|") + ["é", "😀", "日本", "\u00a0", "\u3000", "'ll", "'VE",
                                                                  "<|end|>", "<|endoftext|>", "ﬁ", "Ⅻ", "٣", "\x00"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def logits_diff(net, hf, vocab: int) -> float:
    ids = torch.randint(0, vocab, (2, min(48, net.config.block_size)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (net(ids) - hf(ids).logits).abs().max().item()


def greedy(net, prompt: list[int], n: int) -> list[int]:
    """tinygen's greedy tokens, through the engine that `tinygen sample -t 0` runs."""
    return generate_batch(net, [prompt], SamplingParams(temperature=0.0), n)[0]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    idx = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


# -- the models ----------------------------------------------------------------------------------

def _saved(tmp_path_factory, tokenizer, name: str, seed: int = 2, **fields) -> Path:
    config = ModelConfig(**{**dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=tokenizer.n_vocab),
                            **fields})
    model = make_model(config, seed=seed, scale=3.0)
    with torch.no_grad():  # norms and biases off their init values, or a misplaced one would go unseen
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.5 if "ln" in pname else 0.0, 0.2)
    path = tmp_path_factory.mktemp("export") / f"{name}.safetensors"
    save_checkpoint(path, model, tokenizer)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, model_path, gpt2_arch_path) -> dict[str, Path]:
    made = {
        "tiny": model_path,
        "gqa-untied": _saved(tmp_path_factory, tokenizer, "gqa", n_kv_head=2, tie_embeddings=False,
                             mlp_hidden_size=96, rope_theta=5e5, norm_eps=1e-6),
        "qkv-bias": _saved(tmp_path_factory, tokenizer, "qkv", n_kv_head=1, qkv_bias=True),
        "qk-norm": _saved(tmp_path_factory, tokenizer, "qknorm", n_kv_head=2, qk_norm=True, tie_embeddings=False),
        # head_dim 64, so that several frequencies fall in the smooth band (GGUF keeps only the divisors)
        "llama3-scaling": _saved(tmp_path_factory, tokenizer, "llama3", n_head=2, n_embd=128, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}),
        "gpt2": gpt2_arch_path,
    }
    if BUNDLED.exists():
        made["bundled"] = BUNDLED
    return made


@pytest.fixture(scope="module")
def hf_exports(models, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("hf")
    return {name: export(path, "hf", out / name).path for name, path in models.items()}


# -- Hugging Face --------------------------------------------------------------------------------

HF_CASES = ["bundled", "tiny", "gqa-untied", "qkv-bias", "qk-norm", "llama3-scaling", "gpt2"]
ARCHITECTURES = {"qkv-bias": "Qwen2ForCausalLM", "qk-norm": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}


@pytest.mark.parametrize("case", HF_CASES)
def test_transformers_loads_the_hf_export_with_tinygens_logits_and_greedy_text(case, models, hf_exports):
    if case not in models:
        pytest.skip("weights/ is absent")
    net, tok, _ = load_model(models[case])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_exports[case], dtype=torch.float32).eval()
    auto = transformers.AutoTokenizer.from_pretrained(hf_exports[case])
    # The bundled story model uses qk-norm, which transformers holds as Qwen3.
    assert type(hf).__name__ == ARCHITECTURES.get(case, "Qwen3ForCausalLM" if net.config.qk_norm else "LlamaForCausalLM")
    assert hf.config.tie_word_embeddings == net.config.tie_embeddings
    assert logits_diff(net, hf, tok.n_vocab) <= 1e-4

    prompt = tok.encode(PROMPT)
    assert auto(PROMPT)["input_ids"] == prompt
    ours = greedy(net, prompt, 24)
    theirs = hf_greedy(hf, prompt, 24)
    assert theirs == ours
    assert auto.decode(theirs) == tok.decode(ours)


@pytest.mark.parametrize("case", ["bundled", "tiny"])
def test_autotokenizer_gives_tinygens_ids(case, models, hf_exports):
    if case not in models:
        pytest.skip("weights/ is absent")
    tok = load_model(models[case])[1]
    auto = transformers.AutoTokenizer.from_pretrained(hf_exports[case])
    for text in TEXTS + random_texts(3000):
        assert auto(text)["input_ids"] == tok.encode(text), repr(text)
        assert auto.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    # Whole documents: long runs of ordinary text, where merges compound.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert auto(readme)["input_ids"] == tok.encode(readme)
    assert auto.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("case", ["tiny", "gqa-untied", "qkv-bias", "qk-norm", "gpt2"])
def test_tinygen_loads_its_own_hf_export_back(case, models, hf_exports):
    net, ours, _ = load_model(models[case])
    back, tok, info = load_model(hf_exports[case])
    assert info.kind == ("gpt2" if case == "gpt2" else "llama")
    text = "Spot's 12 cats ran  fast.\n\n\tThe end 😀"
    assert tok.encode(text) == ours.encode(text)  # the gpt2 folder's tokenizer.json, with tinygen's pattern
    shape = ("kv_heads", "mlp_hidden", "qkv_bias", "qk_norm", "tie_embeddings")
    assert [getattr(back.config, k) for k in shape] == [getattr(net.config, k) for k in shape]
    ids = torch.randint(0, tok.n_vocab, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back(ids), net(ids))


CONVERSATIONS = [
    [{"role": "user", "content": "Hi! Tell me a story about 3 cats 😀"}],
    [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hello there."},
     {"role": "assistant", "content": "Hi! How are you?\n  Fine."}, {"role": "user", "content": "Tell me\na story."}],
]


def chat_prompt(net, tok, conversation: list[dict]) -> list[int]:
    """The ids `tinygen chat` sends the model for this conversation."""
    session = ChatSession(net, tok)
    session.set_system(next((m["content"] for m in conversation if m["role"] == "system"), None))
    session.messages = [session._message(m["role"], m["content"]) for m in conversation if m["role"] != "system"]
    return session.prompt_ids()


def test_the_chat_models_hf_template_gives_tinygens_ids(tmp_path, chat_model_path):
    for i, source in enumerate(p for p in (CHAT, chat_model_path) if p.exists()):
        net, tok, _ = load_model(source)
        folder = export(source, "hf", tmp_path / f"chat{i}").path
        auto = transformers.AutoTokenizer.from_pretrained(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert "chat_template" in config
        for conversation in CONVERSATIONS:
            ids = auto.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert list(ids) == chat_prompt(net, tok, conversation)
        generation = json.loads((folder / "generation_config.json").read_text())
        assert generation["eos_token_id"] == [tok.special["<|endoftext|>"], tok.special["<|end|>"]]


def test_a_base_model_has_no_chat_template(hf_exports):
    config = json.loads((hf_exports["tiny"] / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and config["bos_token"] == "<|endoftext|>"


# -- GGUF ----------------------------------------------------------------------------------------

def convert_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, as written there."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@pytest.fixture(scope="module")
def bundled_gguf(tmp_path_factory) -> dict[str, Path]:
    if not BUNDLED.exists():
        pytest.skip("weights/ is absent")
    out = tmp_path_factory.mktemp("gguf")
    return {kind: export(BUNDLED, "gguf", out / f"stories-{kind}.gguf", kind).path for kind in ("f32", "q8_0")}


@needs_bundled
def test_the_gguf_has_llama_cpps_keys_names_and_layout(bundled_gguf, hf_exports):
    reader = gguf.GGUFReader(bundled_gguf["f32"])
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    net = load_model(BUNDLED)[0]
    cfg = net.config
    arch = "qwen3" if cfg.qk_norm else "llama"  # the bundled story model has qk-norm: llama.cpp's qwen3
    assert fields["general.architecture"] == arch
    assert {k: fields[f"{arch}.{k}"] for k in ("context_length", "embedding_length", "block_count",
                                             "feed_forward_length", "rope.dimension_count", "attention.head_count",
                                             "attention.head_count_kv", "vocab_size")} == {
        "context_length": cfg.block_size, "embedding_length": cfg.n_embd, "block_count": cfg.n_layer,
        "feed_forward_length": cfg.mlp_hidden, "rope.dimension_count": cfg.head_dim,
        "attention.head_count": cfg.n_head, "attention.head_count_kv": cfg.kv_heads, "vocab_size": cfg.vocab_size}
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size
    tensors = {t.name: t for t in reader.tensors}
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
                 *(["attn_q_norm", "attn_k_norm"] if cfg.qk_norm else [])]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(cfg.n_layer) for n in per_layer}  # tied: no output.weight
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_exports["bundled"], dtype=torch.float32).state_dict()
    q = hf["model.layers.0.self_attn.q_proj.weight"].numpy()
    k = hf["model.layers.0.self_attn.k_proj.weight"].numpy()
    # llama.cpp's converter permutes llama's q and k rows for its rotary layout, and leaves qwen3's.
    if arch == "llama":
        q, k = convert_permute(q, cfg.n_head), convert_permute(k, cfg.kv_heads)
    assert np.array_equal(tensors["blk.0.attn_q.weight"].data, q)
    assert np.array_equal(tensors["blk.0.attn_k.weight"].data, k)
    assert np.array_equal(tensors["blk.0.attn_v.weight"].data, hf["model.layers.0.self_attn.v_proj.weight"].numpy())

    q8 = {t.name: t.tensor_type.name for t in gguf.GGUFReader(bundled_gguf["q8_0"]).tensors}
    assert q8["blk.0.attn_norm.weight"] == "F32" and q8["output_norm.weight"] == "F32"
    assert q8["blk.0.attn_q.weight"] == "Q8_0" and q8["token_embd.weight"] == "Q8_0"


@needs_bundled
def test_the_f32_gguf_loads_back_in_tinygen_with_identical_greedy_text(bundled_gguf):
    net, tok, _ = load_model(BUNDLED)
    back, back_tok, info = load_model(bundled_gguf["f32"])
    assert info.kind == "gguf"
    prompt = tok.encode(PROMPT)
    assert back_tok.encode(PROMPT) == prompt
    for text in TEXTS + random_texts(1000, seed=1):  # the pre-tokenizer name stands for the same split
        assert back_tok.encode(text) == tok.encode(text), repr(text)
    assert back_tok.stop_ids == tok.stop_ids and not back_tok.add_bos
    ours = greedy(net, prompt, 40)
    assert greedy(back, prompt, 40) == ours
    assert back_tok.decode(ours) == tok.decode(ours)


@needs_bundled
def test_the_q8_0_gguf_stays_close(bundled_gguf):
    net, tok, _ = load_model(BUNDLED)
    back = load_model(bundled_gguf["q8_0"])[0]
    ids = torch.tensor([tok.encode(" ".join(TEXTS[:4]) + " " + PROMPT)])
    with torch.no_grad():
        want, got = net(ids), back(ids)
    assert (want - got).abs().max().item() < 0.5
    assert (want.argmax(-1) == got.argmax(-1)).float().mean().item() >= 0.95
    assert bundled_gguf["q8_0"].stat().st_size < 0.3 * bundled_gguf["f32"].stat().st_size


@pytest.mark.parametrize("case", ["gqa-untied", "llama3-scaling", "qk-norm"])
def test_a_gguf_of_the_llama_switches_loads_back(case, models, tmp_path):
    net = load_model(models[case])[0]
    path = export(models[case], "gguf", tmp_path / "m.gguf", "f32").path
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not net.config.tie_embeddings)
    assert ("rope_freqs.weight" in names) == (net.config.rope_scaling is not None)
    assert reader.fields["general.architecture"].contents() == ("qwen3" if net.config.qk_norm else "llama")
    assert ("blk.1.attn_k_norm.weight" in names) == net.config.qk_norm
    back = load_model(path)[0]
    assert back.config.qk_norm == net.config.qk_norm
    ids = torch.randint(0, net.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (back(ids) - net(ids)).abs().max().item() <= 1e-5


def test_transformers_runs_the_qwen3_gguf_of_a_qk_norm_model_as_tinygen_does(models, tmp_path):
    """transformers' GGUF reader is an implementation apart from ours: it must find Qwen3, with q and
    k unpermuted (llama.cpp's qwen3 rotates Hugging Face's halves) and the per-head norms in place."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from tinygen.formats.export_hf import hf_config

    net, tok, _ = load_model(models["qk-norm"])
    path = export(models["qk-norm"], "gguf", tmp_path / "m.gguf", "f32").path
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    assert (parsed["model_type"], parsed["num_key_value_heads"]) == ("qwen3", net.config.kv_heads)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf_config(net.config, tok, "float32")))
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    assert not hf.load_state_dict(tensors, strict=False).missing_keys
    assert logits_diff(net, hf.eval(), net.config.vocab_size) <= 1e-4


def test_the_chat_models_gguf_renders_chats_as_tinygen_does(tmp_path, chat_model_path):
    net, tok, _ = load_model(chat_model_path)
    path = export(chat_model_path, "gguf", tmp_path / "chat.gguf", "f32").path
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.")}
    assert fields["tokenizer.ggml.eot_token_id"] == tok.special["<|end|>"]
    assert fields["tokenizer.ggml.eos_token_id"] == tok.special["<|endoftext|>"]
    back, back_tok, _ = load_model(path)
    for conversation in CONVERSATIONS:
        assert chat_prompt(back, back_tok, conversation) == chat_prompt(net, tok, conversation)


@needs_bundled
def test_llama_cpp_gives_tinygens_greedy_text(bundled_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    net, tok, _ = load_model(BUNDLED)
    llm = llama_cpp.Llama(model_path=str(bundled_gguf["f32"]), n_ctx=net.config.block_size, n_threads=2,
                          verbose=False)
    for text in TEXTS:
        if text:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), repr(text)
    prompt = tok.encode(PROMPT)
    ours = greedy(net, prompt, 40)
    theirs = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == len(ours):
            break
    assert theirs == ours
    assert llm.detokenize(theirs).decode("utf-8", "replace") == tok.decode(ours)


# -- the command ---------------------------------------------------------------------------------

def test_export_from_the_command_line(cli, tmp_path, model_path):
    out = tmp_path / "tiny.gguf"
    r = cli("export", model_path, "--format", "gguf", "--out", out, "--type", "q8_0")
    assert_ok(r)
    assert r.out == "" and len(r.err.splitlines()) == 1
    assert r.err.startswith(f"wrote {out}") and "q8_0" in r.err and "kB" in r.err
    assert load_model(out)[2].kind == "gguf"

    r = cli("export", model_path, "-f", "hf", "-o", tmp_path / "tiny-hf")
    assert_ok(r)
    assert "LlamaForCausalLM" in r.err
    assert sorted(p.name for p in (tmp_path / "tiny-hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-hf", "tiny.gguf"]  # no temp folders left

    r = cli("sample", "--model", out, "-n", "5", "--temperature", "0", "Once")
    assert_ok(r)


def test_an_existing_output_needs_force(cli, tmp_path, model_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    assert_one_line_error(cli("export", model_path, "-f", "gguf", "-o", out), "exists", "--force")
    assert out.read_bytes() == b"keep me"
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    assert_one_line_error(cli("export", model_path, "-f", "hf", "-o", folder), "exists", "--force")
    assert_ok(cli("export", model_path, "-f", "hf", "-o", folder, "--force"))
    assert not (folder / "old.txt").exists() and (folder / "config.json").exists()
    assert_ok(cli("export", model_path, "-f", "gguf", "-o", out, "--force"))
    assert out.read_bytes()[:4] == b"GGUF"


def test_what_cannot_be_exported_is_one_line(cli, tmp_path, model_path, gpt2_arch_path):
    kept = tmp_path / "kept.gguf"
    kept.write_bytes(b"old")
    r = cli("export", gpt2_arch_path, "-f", "gguf", "-o", kept, "--force")
    assert_one_line_error(r, "gpt2", "--format hf")
    assert kept.read_bytes() == b"old"  # a failed export leaves the old file whole
    assert_one_line_error(cli("export", model_path, "-f", "hf", "-o", tmp_path / "x", "--type", "q8_0"), "--type")
    assert_one_line_error(cli("export", model_path, "-f", "gguf", "-o", tmp_path / "no" / "x.gguf"), "no folder")
    assert_one_line_error(cli("export", model_path, "-f", "onnx", "-o", tmp_path / "x"), "onnx", rc=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.gguf"]
