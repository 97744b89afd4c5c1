"""GGUF reading (tinygen.formats.gguf_reader): small llama GGUFs written here with gguf.GGUFWriter, permuted
the way convert_hf_to_gguf.py does, round-trip to their Hugging Face weights and read as transformers'
own GGUF loader reads them, as does the SmolLM2 GGUF in ../shared/models (skipped when absent);
damaged or foreign files are one TinygenError each."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from modelfiles import gguf_name, hf_unpermute, stored, tiny_llama, write_gguf  # test_quantize imports the last two from here

from tinygen.formats.gguf_reader import read_gguf
from tinygen.errors import TinygenError

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def tiny(tmp_path):
    config, state = tiny_llama()
    return write_gguf(tmp_path / "tiny.gguf", config, state), config, state


# --- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_f32_round_trip_is_exact_and_undoes_the_qk_permutation(tmp_path, tied):
    config, state = tiny_llama(tied=tied)
    path = write_gguf(tmp_path / "m.gguf", config, state)
    m = read_gguf(path)
    assert set(m.tensors) == set(state)
    for name, w in state.items():
        assert torch.equal(m.tensors[name], w), name
    # The file really holds permuted rows (n_kv_head 2 != n_head 4, so k tests the kv count).
    raw = {t.name: t.data for t in gguf.GGUFReader(path).tensors}
    for proj in ("attn_q", "attn_k"):
        hf = "model.layers.0.self_attn." + proj[-1] + "_proj.weight"
        assert not np.array_equal(raw[f"blk.0.{proj}.weight"], state[hf].numpy())
    assert m.config["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in m.tensors) is not tied


def test_config_in_llamaconfig_keys(tiny):
    path, config, _ = tiny
    m = read_gguf(path)
    for key, value in config.items():
        assert m.config[key] == pytest.approx(value), key
    assert "head_dim" not in m.config and "rope_scaling" not in m.config
    assert m.rope_freqs is None


def test_config_and_weights_run_in_transformers_as_the_original(tiny):
    transformers = pytest.importorskip("transformers")
    path, config, state = tiny
    m = read_gguf(path)
    ours = transformers.LlamaForCausalLM(transformers.LlamaConfig(**m.config)).eval()
    original = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    for model, weights in ((ours, m.tensors), (original, state)):
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected
        model.tie_weights()
    ids = torch.randint(0, config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, original(ids).logits)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_1, Q.Q4_K], ids=lambda q: q.name)
def test_transformers_reads_the_written_file_the_same(tmp_path, qtype):
    """As transformers' own GGUF loader reads it, in the types SmolLM2's GGUF mixes (and a k-quant)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config, state = tiny_llama(d=256, ff=256) if qtype == Q.Q4_K else tiny_llama()
    path = write_gguf(tmp_path / "m.gguf", config, state, qtype=qtype)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    ours = read_gguf(path).tensors
    assert set(theirs) == set(ours)
    for name, w in ours.items():
        assert torch.equal(theirs[name], w), name


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_quantized_round_trip(tmp_path, qtype):
    config, state = tiny_llama()
    path = write_gguf(tmp_path / "m.gguf", config, state, qtype=qtype)
    m = read_gguf(path)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for name, w in state.items():
        if w.ndim == 1:
            assert torch.equal(m.tensors[name], w), name
            continue
        # What gguf itself dequantizes from the stored (permuted, quantized) rows, unpermuted apart from ours.
        expected = gguf.quants.dequantize(gguf.quants.quantize(stored(name, w, config), qtype), qtype)
        n_head = next((n for proj, n in heads.items() if f".{proj}." in name), 0)
        if n_head:
            expected = hf_unpermute(expected, n_head)
        assert torch.equal(m.tensors[name], torch.from_numpy(np.ascontiguousarray(expected))), name
        assert (m.tensors[name] - w).abs().max() <= 0.2 * w.abs().max(), name  # near the original weights


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # random scales include NaNs
def test_k_quants_dequantize_like_gguf(tmp_path, qtype):
    """gguf cannot quantize k-quants, so their blocks are random bytes here; the reader must dequantize
    and unpermute them as gguf and transformers do."""
    config, state = tiny_llama(d=256, n_head=4, n_kv=2, ff=256, n_layer=1)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    names = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.0.mlp.up_proj.weight")
    raw = {hf: rng.integers(0, 256, (state[hf].shape[0], 256 // block * size), dtype=np.uint8) for hf in names}
    path = write_gguf(tmp_path / "k.gguf", config, state, drop={gguf_name(hf) for hf in names},
                      extra={gguf_name(hf): (data, qtype) for hf, data in raw.items()})
    m = read_gguf(path)
    for hf, data in raw.items():
        expected = gguf.quants.dequantize(data, qtype)
        n_head = 4 if "q_proj" in hf else 2 if "k_proj" in hf else 0
        if n_head:
            expected = hf_unpermute(expected, n_head)
        torch.testing.assert_close(m.tensors[hf], torch.from_numpy(np.ascontiguousarray(expected)),
                                   rtol=0, atol=0, equal_nan=True)
    assert m.report.counts["attn_q"] == {qtype.name: 1}


def test_dtype_and_biases(tmp_path):
    config, state = tiny_llama(bias=True)
    path = write_gguf(tmp_path / "b.gguf", config, state, qtype=Q.F16)
    m = read_gguf(path, dtype=torch.bfloat16)
    assert m.config["attention_bias"] and not m.config["mlp_bias"]
    for name, w in state.items():
        assert m.tensors[name].dtype == torch.bfloat16
        assert torch.equal(m.tensors[name], w.half().to(torch.bfloat16) if w.ndim == 2 else w.to(torch.bfloat16))
    with pytest.raises(TinygenError, match="floating-point"):
        read_gguf(path, dtype=torch.int8)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_4_bit_matrices_are_read_as_stored_when_asked_and_dequantize_to_the_same_weights(tmp_path, qtype):
    """read_gguf offers each Q4_0/Q4_1 matrix as stored, read from the file only when called (the
    rows of q and k unpermuted like the float ones), and its blocks are the file's numbers."""
    config, state = tiny_llama()
    path = write_gguf(tmp_path / "q.gguf", config, state, qtype=qtype)
    m = read_gguf(path)
    assert set(m.stored) == {k for k, w in state.items() if w.ndim == 2}
    for name, stored in m.stored.items():
        q = stored.read()
        assert stored.form == "int4" and q.q.dtype == torch.uint8 and int(q.q.max()) <= 15
        assert q.scales.shape == (q.q.shape[0], q.q.shape[1] // 32)
        torch.testing.assert_close(q.dequantize(), m.tensors[name], rtol=0, atol=1e-6, msg=name)


def test_4_bit_matrices_of_a_file_changed_since_it_was_read_are_refused_in_one_line(tmp_path):
    config, state = tiny_llama()
    path = write_gguf(tmp_path / "q.gguf", config, state, qtype=Q.Q4_1)
    m = read_gguf(path)
    read = next(iter(m.stored.values())).read
    before = path.stat().st_mtime_ns
    write_gguf(path, config, {k: v * 2 for k, v in state.items()}, qtype=Q.Q4_1)  # another model, same layout
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a second later, on a filesystem of any clock grain
    with pytest.raises(TinygenError, match="changed or removed since it was loaded"):
        read()
    path.unlink()
    with pytest.raises(TinygenError, match="changed or removed since it was loaded"):
        read()


def test_fields_and_report(tiny):
    path, config, _ = tiny
    m = read_gguf(path)
    assert m.fields["general.architecture"] == "llama"
    assert m.fields["tokenizer.ggml.tokens"][:3] == ["t0", "t1", "t2"]
    assert m.fields["tokenizer.ggml.merges"] == ["t 1", "t 2"]
    assert m.fields["tokenizer.ggml.bos_token_id"] == 1 and m.fields["tokenizer.ggml.eos_token_id"] == 2
    assert m.fields["tokenizer.chat_template"] == "{{ messages }}"
    assert not any(k.startswith("GGUF.") for k in m.fields)
    r = m.report
    assert r.counts["attn_q"] == {"F32": 2} and r.counts["token_embd"] == {"F32": 1}
    assert "attn_q: F32 x2" in r.lines() and "token_embd: F32" in r.lines()
    n = 2 + 9 * config["num_hidden_layers"]
    assert r.summary().startswith(f"converted {n} tensors (F32 x{n}; ") and " to float32 (" in r.summary()
    assert r.bytes_in == r.bytes_out == sum(w.nbytes for w in m.tensors.values())


def test_import_stays_free_of_gguf():
    code = "import sys, tinygen.formats.gguf_reader; print('gguf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- Llama 3 rope scaling ----------------------------------------------------------------------------


def llama3_rope_freqs(theta, dim, factor, low, high, context=8192):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, float32 as there."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            out.append(1)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


@pytest.mark.parametrize(("theta", "head_dim", "factor", "low", "high"), [
    (500000.0, 128, 8.0, 1.0, 4.0),  # Llama 3.1 8B
    (500000.0, 64, 32.0, 1.0, 4.0),  # Llama 3.2 1B
    (500000.0, 64, 8.0, 2.0, 8.0),
    (10000.0, 64, 16.0, 1.0, 4.0),
])
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, theta, head_dim, factor, low, high):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config, state = tiny_llama(d=2 * head_dim, n_head=2, n_kv=1, n_layer=1)
    config["rope_theta"] = theta
    freqs = llama3_rope_freqs(theta, head_dim, factor, low, high)
    path = write_gguf(tmp_path / "r.gguf", config, state, extra={"rope_freqs.weight": freqs})
    m = read_gguf(path)
    s = m.config["rope_scaling"]
    assert s["rope_type"] == "llama3" and s["original_max_position_embeddings"] == 8192
    assert (s["factor"], s["low_freq_factor"], s["high_freq_factor"]) == pytest.approx((factor, low, high))
    assert torch.equal(m.rope_freqs, torch.from_numpy(freqs))
    assert m.report.counts["rope_freqs"] == {"F32": 1}
    # transformers' llama3 rope on the reconstructed parameters divides the base frequencies as llama.cpp does.
    hf = transformers.LlamaConfig(**{k: v for k, v in m.config.items() if k != "rope_scaling"},
                                  rope_scaling=s)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    torch.testing.assert_close(inv_freq, base / m.rope_freqs, rtol=1e-5, atol=0)


def test_rope_freqs_of_ones_is_no_scaling_and_other_shapes_are_refused(tmp_path):
    config, state = tiny_llama(d=128, n_head=2, n_kv=1, n_layer=1)
    ones = write_gguf(tmp_path / "ones.gguf", config, state, extra={"rope_freqs.weight": np.ones(32, np.float32)})
    assert "rope_scaling" not in read_gguf(ones).config
    odd = np.linspace(1, 5, 32, dtype=np.float32)[::-1].copy()
    path = write_gguf(tmp_path / "odd.gguf", config, state, extra={"rope_freqs.weight": odd})
    with pytest.raises(TinygenError, match="not Llama 3 rope scaling"):
        read_gguf(path)


# --- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("meta", "match"), [
    ({"llama.expert_count": 8}, "llama.expert_count = 8 is not supported"),
    ({"llama.rope.scaling.type": "yarn"}, "llama.rope.scaling.type = 'yarn'"),
    ({"llama.rope.scaling.factor": 4.0}, "llama.rope.scaling.factor = 4.0"),
    ({"llama.attn_logit_softcapping": 50.0}, "llama.attn_logit_softcapping"),
    ({"llama.attention.scale": 0.5}, "llama.attention.scale"),
    ({"llama.some_new_switch": 3}, "metadata llama.some_new_switch = 3 is not supported"),
    ({"llama.rope.dimension_count": 8}, "rotary embeddings on 8 of each head's 16 dimensions"),
    ({"llama.rope.freq_base": "fast"}, r"llama.rope.freq_base = 'fast' is not supported \(expected one float\)"),
    ({"llama.attention.key_length": 16, "llama.attention.value_length": 32}, r"apart from the keys' \(16\)"),
    ({"llama.feed_forward_length": 100}, r"blk.0.ffn_gate.weight has shape \(128, 64\) but the metadata makes it "
                                         r"\(100, 64\)"),
    ({"llama.vocab_size": 97}, "token_embd.weight has shape"),
    ({"llama.block_count": 1}, "blk.1.attn_norm.weight is not part of a 1-layer llama model"),
    ({"llama.block_count": 3}, r"lacks 9 tensor\(s\) of a 3-layer llama model \(blk.2.attn_norm.weight"),
    ({"llama.attention.head_count_kv": 3}, "4 query heads cannot share 3"),
    ({"llama.attention.layer_norm_rms_epsilon": None}, "has no llama.attention.layer_norm_rms_epsilon"),
    ({"llama.attention.head_count": [4, 4, 2]}, r"llama.attention.head_count = \[4, 4, 2\] is not supported"),
    ({"split.count": 3}, "split GGUF"),
])
def test_refuses_what_plain_llama_does_not_have(tmp_path, meta, match):
    config, state = tiny_llama()
    path = write_gguf(tmp_path / "m.gguf", config, state, meta=meta)
    with pytest.raises(TinygenError, match=match) as e:
        read_gguf(path)
    assert "\n" not in str(e.value)


def test_uniform_per_layer_arrays_and_neutral_switches_are_accepted(tmp_path):
    config, state = tiny_llama()
    meta = {"llama.attention.head_count": [4, 4], "llama.expert_count": 0, "llama.rope.scaling.type": "none",
            "llama.attention.causal": True, "general.name": "tiny"}
    m = read_gguf(write_gguf(tmp_path / "m.gguf", config, state, meta=meta))
    assert m.config["num_attention_heads"] == 4


def test_missing_tensor(tmp_path):
    config, state = tiny_llama()
    path = write_gguf(tmp_path / "m.gguf", config, state, drop={"blk.1.ffn_up.weight"})
    with pytest.raises(TinygenError, match=r"lacks 1 tensor\(s\) of a 2-layer llama model \(blk.1.ffn_up.weight\)"):
        read_gguf(path)


@pytest.mark.parametrize("name, shape", [("blk.0.ffn_gate_exps.weight", (2, 4)),
                                         ("blk.0.attn_q_norm.weight", (16,))])  # qwen3's, not llama's
def test_unknown_tensor(tmp_path, name, shape):
    config, state = tiny_llama()
    path = write_gguf(tmp_path / "m.gguf", config, state, extra={name: np.zeros(shape, np.float32)})
    with pytest.raises(TinygenError, match=f"{name} is not part of a 2-layer llama model"):
        read_gguf(path)


def test_other_architecture(tmp_path):
    config, state = tiny_llama()
    path = write_gguf(tmp_path / "g.gguf", config, state, arch="gpt2")
    with pytest.raises(TinygenError, match="architecture 'gpt2' is not supported; tinygen reads llama"):
        read_gguf(path)


def test_unsupported_quant_type_names_tensor_and_type(tmp_path):
    config, state = tiny_llama()
    # Q8_1 is a real ggml type (llama.cpp's activation format) that gguf-py cannot dequantize.
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    q8_1 = (np.zeros((128, 64 // block * size), np.uint8), Q.Q8_1)
    path = write_gguf(tmp_path / "q.gguf", config, state, drop={"blk.0.ffn_up.weight"},
                      extra={"blk.0.ffn_up.weight": q8_1})
    with pytest.raises(TinygenError, match="tensor blk.0.ffn_up.weight is Q8_1, which the gguf package cannot"):
        read_gguf(path)


def test_type_unknown_to_gguf(tiny, tmp_path):
    path, _, _ = tiny
    data = path.read_bytes()
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8  # after n_dims and two dims comes the type
    assert int.from_bytes(data[at:at + 4], "little") == Q.F32
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:at] + (99).to_bytes(4, "little") + data[at + 4:])
    with pytest.raises(TinygenError, match="tensor type the installed gguf package does not know .*99"):
        read_gguf(bad)


# --- damaged or foreign files ------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.02, 6])
def test_truncated(tiny, tmp_path, keep):
    path, _, _ = tiny
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(TinygenError, match="cut.gguf is truncated or damaged .*download it again") as e:
        read_gguf(cut)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b"", b"GG", b"\x00" * 100, bytes(range(256)) * 40])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(TinygenError, match="x.gguf is not a GGUF file"):
        read_gguf(path)


def test_random_bytes_after_the_magic(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(TinygenError, match="truncated or damaged"):
        read_gguf(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(TinygenError, match="cannot read .*nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(TinygenError, match="is a folder; pass the .gguf file inside it"):
        read_gguf(tmp_path)


# --- the real SmolLM2 file against transformers ------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(not SMOLLM2.exists(), reason=f"{SMOLLM2} is absent")


@pytest.fixture(scope="module")
def smollm2():
    return read_gguf(SMOLLM2)


@needs_smollm2
def test_smollm2_matches_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # transformers maps GGUF names through a model's parameter names
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**smollm2.config))
    parsed = load_gguf_checkpoint(str(SMOLLM2), return_tensors=True, model_to_load=model)
    theirs, hf = parsed["tensors"], parsed["config"]
    ours = smollm2.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings"):
        assert ours[key] == hf[key], key
    assert ours.get("head_dim", ours["hidden_size"] // ours["num_attention_heads"]) == hf["head_dim"]
    assert set(theirs) == set(smollm2.tensors)
    for name, w in smollm2.tensors.items():
        torch.testing.assert_close(w, theirs[name], rtol=0, atol=1e-6, msg=name)


@needs_smollm2
def test_smollm2_report_and_fields(smollm2):
    r = smollm2.report
    assert r.by_type() == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert r.counts["token_embd"] == {"Q8_0": 1} and r.counts["attn_q"] == {"Q4_1": 30}
    assert r.summary().startswith("converted 272 tensors (Q4_1 x210, F32 x61, Q8_0 x1; ")
    assert smollm2.config["tie_word_embeddings"] and "lm_head.weight" not in smollm2.tensors
    f = smollm2.fields
    assert len(f["tokenizer.ggml.tokens"]) == 49152 and f["tokenizer.ggml.tokens"][1] == "<|im_start|>"
    assert f["tokenizer.ggml.pre"] == "smollm" and "<|im_start|>" in f["tokenizer.chat_template"]


@needs_smollm2
def test_smollm2_truncated(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(SMOLLM2, "rb") as src:
        cut.write_bytes(src.read(SMOLLM2.stat().st_size // 2))
    with pytest.raises(TinygenError, match="truncated or damaged"):
        read_gguf(cut)
