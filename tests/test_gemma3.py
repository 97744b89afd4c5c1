"""Gemma 3 (the text model): random small Gemma3ForCausalLM models of transformers' own class, read
from Hugging Face folders and from GGUFs in llama.cpp's layout, give the logits transformers gives;
the KV cache keeps sliding layers inside their window in prefill, decode steps past the window,
batched rows of different lengths and the explicit attention path; exports round-trip; switches
tinygen does not implement are refused in one line. A Hugging Face config that leaves out
tie_word_embeddings follows transformers' default for its model_type."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import assert_ok
from gemma_files import SMALL, gemma3_model, write_gemma3_gguf, write_hf_folder
from modelfiles import transformers_llama, write_gpt2_files

from tinygen.core.checkpoint import load_model
from tinygen.core.config import ModelConfig
from tinygen.core.model import GPT
from tinygen.errors import TinygenError
from tinygen.formats.llama import config_from_hf
from tinygen.generate.engine import (
    decode,
    generate_batch,
    naive_generate,
    prefill,
    stream,
)
from tinygen.generate.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0)
LINEAR = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 20_000.0},
          "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}
CASES = {  # name -> Gemma3TextConfig beyond gemma_files.SMALL
    "small": {},
    # Soft-capped logits, linear rope scaling on the global layers, an untied head; and attention
    # soft-capping, which transformers' Gemma 3 leaves unapplied.
    "caps-linear-untied": dict(final_logit_softcapping=4.0, attn_logit_softcapping=3.0, rope_parameters=LINEAR,
                               tie_word_embeddings=False),
    # A query scale apart from the head size's, which a GGUF cannot hold (llama.cpp scales by its own rule).
    "query-scalar": dict(query_pre_attn_scalar=24),
    # Four layers, alternating, with a key/value head per query head.
    "alternating-mha": dict(num_hidden_layers=4, num_key_value_heads=4, sliding_window=3,
                            layer_types=["sliding_attention", "full_attention"] * 2),
}
SEQ = 24  # well past every case's window
FORMS = {"hf": 1e-5, "f32": 1e-5, "f16": 2e-2}  # each form's tolerance


@pytest.fixture(scope="module")
def vocab(tokenizer) -> int:
    return len(tokenizer.ranks) + 1  # the trained tokens, then <|endoftext|>


@pytest.fixture(scope="module")
def models(vocab):
    return {name: gemma3_model(vocab, seed=i, **overrides) for i, (name, overrides) in enumerate(CASES.items())}


@pytest.fixture(scope="module")
def files(tmp_path_factory, models, tokenizer) -> dict[str, dict[str, Path]]:
    """For each case, its Hugging Face folder and its GGUF in F32 and in F16."""
    root = tmp_path_factory.mktemp("gemma3")
    return {name: {"hf": write_hf_folder(root / name, hf, tokenizer.ranks),
                   "f32": write_gemma3_gguf(root / f"{name}.gguf", hf, tokenizer.ranks),
                   "f16": write_gemma3_gguf(root / f"{name}-f16.gguf", hf, tokenizer.ranks, "F16")}
            for name, hf in models.items()}


def ids(vocab: int, rows: int = 1, length: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small(files) -> GPT:
    net, _, _ = load_model(files["small"]["hf"], device="cpu", dtype=torch.float32)
    return net


@pytest.mark.parametrize("case, form", [(c, f) for c in CASES for f in FORMS if c != "query-scalar" or f == "hf"])
def test_a_gemma3_file_gives_the_logits_transformers_gives(files, models, vocab, case, form):
    net, _, info = load_model(files[case][form], device="cpu", dtype=torch.float32)
    atol = FORMS[form]
    hf = models[case]
    batch = ids(vocab, rows=2)
    with torch.no_grad():
        want = hf(batch).logits
        torch.testing.assert_close(net(batch), want, rtol=0, atol=atol)
        torch.testing.assert_close(net.attention(batch)[0], want, rtol=0, atol=atol)  # the explicit path
    cfg = info.config
    assert cfg.family == "gemma3" and not cfg.unportable
    assert cfg.sliding_layers == tuple(i for i, t in enumerate(hf.config.layer_types) if t == "sliding_attention")
    assert 0 < len(cfg.sliding_layers) < cfg.n_layer  # both kinds of layer are tested
    assert cfg.head_dim == 16 != cfg.n_embd // cfg.n_head and cfg.tie_embeddings == hf.config.tie_word_embeddings


def test_in_bfloat16_the_embedding_factor_rounds_as_transformers_rounds_it(files, models, vocab):
    """sqrt(48) is 6.9375 in bfloat16, as transformers' Gemma multiplies by it; and a bfloat16 model's
    logits stay as near the float32 ones as transformers' own bfloat16 model's do."""
    net, _, _ = load_model(files["small"]["hf"], device="cpu", dtype=torch.bfloat16)
    assert net.embed_factor.item() == 6.9375 and net.embed_factor.dtype == torch.bfloat16
    batch = ids(vocab)
    with torch.no_grad():
        exact = models["small"](batch).logits
        theirs = transformers.AutoModelForCausalLM.from_pretrained(files["small"]["hf"], dtype=torch.bfloat16)(batch)
        assert (net(batch).float() - exact).abs().max() <= 2 * (theirs.logits.float() - exact).abs().max()


def test_the_window_and_the_local_rotary_base_change_the_logits(small, vocab):
    """Not vacuous: without its window, or with the global base on every layer, the model differs."""
    batch = ids(vocab)
    with torch.no_grad():
        want = small(batch)
        for change in (dict(sliding_window=SEQ), dict(rope_local_theta=None)):
            other = GPT(replace(small.config, **change), init=False).eval()
            other.load_state_dict(small.state_dict())
            assert (other(batch) - want).abs().max() > 1e-2, change


def test_sliding_layers_attend_only_within_their_window(small, vocab):
    _, atts = small.attention(ids(vocab))
    window = small.config.sliding_window
    back = torch.arange(SEQ)[:, None] - torch.arange(SEQ)[None, :]  # how far back each key is
    for layer, att in enumerate(atts):  # (B, H, T, T)
        seen = att[0].amax(0) > 0
        if small.config.is_sliding(layer):
            assert torch.equal(seen, (back >= 0) & (back < window)), layer
        else:
            assert torch.equal(seen, back >= 0), layer


@pytest.mark.parametrize("case", CASES)
def test_cached_decoding_past_the_window_matches_the_full_recompute(files, models, vocab, case):
    """Token by token through the engine's prefill and decode steps, the logits at every position
    are those of one full pass, far past the window; and greedy decoding is transformers' own."""
    net, _, _ = load_model(files[case]["hf"], device="cpu", dtype=torch.float32)
    seq = ids(vocab, length=SEQ + 6, seed=2)
    with torch.inference_mode():
        full = net(seq)[0]
        cache, logits = prefill(net, [seq[0, :3].tolist()], max_len=SEQ + 6)
        steps = [logits[0]]
        for p in range(3, SEQ + 6):
            steps.append(decode(net, cache, seq[0, p:p + 1], [p])[0])
    torch.testing.assert_close(torch.stack(steps), full[2:], rtol=0, atol=1e-5)
    prompt = seq[0, :4].tolist()
    mine = list(stream(net, prompt, GREEDY, 20))
    assert mine == naive_generate(net, prompt, 20)
    with torch.no_grad():
        theirs = models[case].generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, 4:].tolist()
    assert mine == theirs
    if not models[case].config.tie_word_embeddings:  # a random tied head repeats a token; an untied one varies
        assert len(set(mine)) > 3


def test_batched_rows_of_different_lengths_keep_their_own_windows(small, vocab):
    """Rows right-padded into one prefill, then decoded each at its own position: every row's
    logits are those of the row alone, before and after its window fills."""
    rows = [ids(vocab, length=n, seed=n)[0].tolist() for n in (2, 7, 13)]
    more = ids(vocab, rows=3, length=12, seed=9)
    with torch.inference_mode():
        cache, logits = prefill(small, rows, max_len=SEQ + 4)
        got = [[row] for row in logits]
        cached = [len(r) for r in rows]
        for step in range(12):
            logits = decode(small, cache, more[:, step], cached)
            for i, row in enumerate(logits):
                got[i].append(row)
            cached = [n + 1 for n in cached]
        for i, row in enumerate(rows):
            alone = small(torch.tensor([row + more[i].tolist()]))[0, len(row) - 1:]
            torch.testing.assert_close(torch.stack(got[i]), alone, rtol=0, atol=1e-5)
    prompts = [r[:n] for r, n in zip(rows, (2, 6, 11))]
    assert generate_batch(small, prompts, GREEDY, 10) == [naive_generate(small, p, 10) for p in prompts]


def test_a_conversation_reuses_its_cache_past_the_window(small, vocab):
    """A second turn prefills only its new tokens after the reused ones (engine.extend): its queries
    keep the window over the cached keys too."""
    from tinygen.generate.context import Context

    context = Context()
    first = ids(vocab, length=9, seed=5)[0].tolist()
    reply = list(stream(small, first, GREEDY, 4, context=context))
    second = first + reply + ids(vocab, length=8, seed=6)[0].tolist()
    assert list(stream(small, second, GREEDY, 8, context=context)) == naive_generate(small, second, 8)
    assert context.reused == len(first) + len(reply) - 1


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_the_static_decoder_keeps_the_window(small, vocab, compile, tmp_path, monkeypatch):
    from tinygen.generate.compiled import StaticDecoder

    if compile:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    decoder = StaticDecoder(small, compile=compile)
    prompt = ids(vocab, length=3, seed=4)[0].tolist()
    assert list(stream(small, prompt, GREEDY, 25, decoder=decoder)) == naive_generate(small, prompt, 25)


def test_a_gemma3_folder_samples_at_the_cli_as_transformers_generates(files, models, tokenizer, cli):
    text = "Once upon a time"
    prompt = tokenizer.encode(text)
    with torch.no_grad():
        want = models["small"].generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):]
    r = cli("sample", "-m", files["small"]["hf"], text, "-n", "6", "-t", "0", "--device", "cpu")
    assert_ok(r)
    assert r.text == tokenizer.decode(want.tolist())



def test_info_names_the_gemma3_switches(files, cli):
    r = cli("info", "-m", files["small"]["f32"])
    assert_ok(r)
    row = next(line for line in r.text.splitlines() if line.startswith("architecture"))
    for switch in ("qk-norm", "sliding window 5 in 5 of 6 layers", "local rope theta 1000", "post-norms",
                   "embedding scale", "GeGLU MLP"):
        assert switch in row, switch

def test_a_multimodal_gemma3_folder_loads_its_text_model(tmp_path, tokenizer, vocab):
    """model_type "gemma3": the text model under text_config and model.language_model., beside a
    vision tower that tinygen leaves behind."""
    torch.manual_seed(3)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    text = transformers.Gemma3TextConfig(**{**SMALL, "vocab_size": vocab})
    hf = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=vocab - 1)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    folder = write_hf_folder(tmp_path / "mm", hf, tokenizer.ranks)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gemma3"
    net, _, info = load_model(folder, device="cpu", dtype=torch.float32)
    batch = ids(vocab - 1)
    with torch.no_grad():
        torch.testing.assert_close(net(batch), hf(input_ids=batch).logits, rtol=0, atol=1e-5)
    assert info.config.family == "gemma3" and info.n_params == sum(
        p.numel() for n, p in hf.named_parameters() if "language_model" in n)


def test_a_gemma3_model_exports_to_transformers_and_to_gguf(files, models, vocab, tmp_path):
    from tinygen.formats.export import export

    batch = ids(vocab)
    for case in ("small", "caps-linear-untied", "query-scalar"):
        with torch.no_grad():
            want = models[case](batch).logits
        export(files[case]["hf"], "hf", tmp_path / f"{case}-hf")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{case}-hf").eval()
        with torch.no_grad():
            torch.testing.assert_close(back(batch).logits, want, rtol=0, atol=1e-5)
    export(files["small"]["hf"], "gguf", tmp_path / "small.gguf", gguf_type="f32")
    net, _, _ = load_model(tmp_path / "small.gguf", device="cpu", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(net(batch), models["small"](batch).logits, rtol=0, atol=1e-5)
    with pytest.raises(TinygenError, match="attention scalar"):  # llama.cpp's gemma3 scales by its own rule
        export(files["query-scalar"]["hf"], "gguf", tmp_path / "scalar.gguf")


def test_llama_cpp_reads_the_gguf_as_tinygen_does(files, models, vocab, tmp_path):
    """The GGUF layout the tests write (and tinygen reads) is llama.cpp's, and so is the one tinygen
    exports: llama.cpp gives the same logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from tinygen.formats.export import export

    batch = ids(vocab)
    exported = export(files["alternating-mha"]["hf"], "gguf", tmp_path / "exported.gguf", gguf_type="f32").path
    for case, path in [("small", files["small"]["f32"]), ("alternating-mha", files["alternating-mha"]["f32"]),
                       ("alternating-mha", exported)]:
        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, verbose=False)
        llm.eval(batch[0].tolist())
        with torch.no_grad():
            want = models[case](batch).logits[0]
        torch.testing.assert_close(torch.tensor(np.array(llm.scores[:SEQ])), want, rtol=0, atol=2e-2)


# -- what tinygen refuses, and what it leaves out of a config -------------------------------------


@pytest.mark.parametrize("change, needle", [
    ({"hidden_activation": "gelu"}, "hidden_activation"),
    ({"use_bidirectional_attention": True}, "bidirectional"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "yarn"),
    ({"layer_types": ["sliding_attention"] * 2}, "layer_types"),
])
def test_a_gemma3_switch_tinygen_does_not_implement_is_refused_by_name(files, tmp_path, cli, change, needle):
    from conftest import assert_one_line_error

    folder = tmp_path / "m"
    shutil.copytree(files["small"]["hf"], folder)
    config = {**json.loads((folder / "config.json").read_text()), **change}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TinygenError, match=needle):
        config_from_hf(config, "config.json")
    assert_one_line_error(cli("sample", "-m", folder, "x", "-n", "1", "--device", "cpu"), needle)


@pytest.mark.parametrize("meta, needle", [({"rope.scaling.type": "yarn"}, "yarn"),
                                          ({"attention.sliding_window_pattern": "six"}, "sliding_window_pattern"),
                                          ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping")])
def test_a_gemma3_gguf_with_an_unknown_switch_is_refused_by_name(models, tokenizer, tmp_path, meta, needle):
    path = write_gemma3_gguf(tmp_path / "m.gguf", models["small"], tokenizer.ranks, meta=meta)
    with pytest.raises(TinygenError, match=needle):
        load_model(path, device="cpu")


def test_a_gguf_without_a_sliding_window_has_only_global_layers(models, tokenizer, tmp_path):
    """As llama.cpp reads it: no gemma3.attention.sliding_window, no sliding layers."""
    path = write_gemma3_gguf(tmp_path / "m.gguf", models["small"], tokenizer.ranks,
                             meta={"attention.sliding_window": None})
    _, _, info = load_model(path, device="cpu")
    assert info.config.sliding_layers == () and info.config.sliding_window is None


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory, tokenizer) -> Path:
    return write_gpt2_files(tmp_path_factory.mktemp("tokenizer"), tokenizer.ranks)


@pytest.mark.parametrize("kind, tied", [("llama", False), ("qwen2", False), ("qwen3", False), ("mistral", False),
                                        ("gemma3_text", True)])
def test_a_config_without_tie_word_embeddings_follows_transformers_default(kind, tied, tmp_path, gpt2_style, vocab):
    """transformers unties Llama, Mistral and Qwen heads unless told, and ties Gemma 3's: a stored
    lm_head.weight is the head then, not dropped for the embedding."""
    folder = tmp_path / kind
    if kind == "gemma3_text":
        hf = gemma3_model(vocab, tie_word_embeddings=tied)
    else:
        hf = transformers_llama(kind, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                           max_position_embeddings=64, tie_word_embeddings=tied, head_dim=8))
    hf.save_pretrained(folder, safe_serialization=True)
    transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_style)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["tie_word_embeddings"]
    (folder / "config.json").write_text(json.dumps(config))
    assert transformers.AutoConfig.from_pretrained(folder).tie_word_embeddings is tied
    net, _, info = load_model(folder, device="cpu", dtype=torch.float32)
    assert info.config.tie_embeddings is tied
    batch = ids(vocab)
    with torch.no_grad():
        torch.testing.assert_close(net(batch), hf(batch).logits, rtol=0, atol=1e-5)


def test_a_gemma3_config_keeps_its_header_form():
    """The header JSON of a Gemma 3 config reads back equal; a config without Gemma's switches writes
    none of their keys, so older checkpoints' headers are unchanged."""
    cfg = ModelConfig(n_layer=4, n_head=2, n_embd=32, head_size=32, post_norms=True, embed_scale=True, qk_norm=True,
                      mlp="geglu", sliding_window=8, sliding_layers=(0, 2), rope_local_theta=1e4,
                      rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg and cfg.family == "gemma3" and not cfg.unportable
    plain = json.loads(ModelConfig().to_json())
    assert not {"head_size", "post_norms", "sliding_layers", "sliding_window", "embed_scale"} & set(plain)
    assert ModelConfig(n_head=4, n_embd=64, head_size=16).head_size is None  # the default's own value
    llama = ModelConfig(n_layer=2, sliding_window=4, sliding_layers=(1,))
    assert "sliding-window layers" in llama.unportable  # tinygen's own exports refuse what Llama cannot hold
    for bad in (dict(sliding_layers=(3, 1)), dict(sliding_layers=(9,)), dict(sliding_window=4),
                dict(rope_scaling={"rope_type": "linear"})):
        with pytest.raises(TinygenError):
            ModelConfig(n_layer=4, **bad)


# -- the real file, where it is installed ------------------------------------------------------------

GEMMA_270M = Path("/work/models/gemma-3-270m-q4_k_m.gguf")


@pytest.mark.skipif(not GEMMA_270M.exists(), reason="Gemma 3 270M is not installed here")
def test_gemma_3_270m_gives_llama_cpps_next_tokens():
    """The real file, dequantized to float32, against llama.cpp running it as stored (whose matmuls
    quantize the activations too, so near-ties may fall either way): the same next token almost
    everywhere, and logits close. With the same float32 weights the two agree to a few hundredths."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from tinygen.formats import llama
    from tinygen.formats.gguf_reader import read_gguf

    gguf = read_gguf(GEMMA_270M)  # its SentencePiece vocabulary is another loader's: the weights alone here
    config, _ = llama.config_from_hf(gguf.config, GEMMA_270M.name)
    net = GPT(config, init=False).eval()
    net.load_state_dict(llama.state_from_hf(gguf.tensors, config, GEMMA_270M.name), strict=False)
    prompt = [2] + torch.randint(100, 20_000, (39,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ours = net(torch.tensor([prompt]))[0]
    llm = llama_cpp.Llama(str(GEMMA_270M), logits_all=True, n_ctx=64, verbose=False)
    llm.eval(prompt)
    theirs = torch.tensor(np.array(llm.scores[:len(prompt)]))
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9
    assert (ours - theirs).abs().max() < 0.1 * theirs.abs().max()
