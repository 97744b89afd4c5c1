"""Every kind of model file tinygen loads, built here with random weights, so that a fresh clone
tests every loader: a tinygen checkpoint; Hugging Face folders as transformers saves them (GPT-2
with vocab.json + merges.txt or with a tokenizer.json, and each Llama-family model_type, one of them
sharded); and llama and qwen3 GGUFs in every tensor type gguf can dequantize. Each loads through
load_model to finite logits (transformers' own logits, for a folder; gguf's own dequantized values
as weights, for a GGUF), samples at the command line what the library generates, and shows in
`tinygen info` (for GGUFs, read_info in every type and the command for one file of each
architecture). The real SmolLM2 in ../shared adds its own checks in test_gguf_model.py."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import ForkServer, assert_ok
from modelfiles import (
    gguf_tokenizer_fields,
    hf_unpermute,
    tiny_llama,
    transformers_llama,
    write_gguf,
    write_gpt2_files,
)

from tinygen.core.checkpoint import load_model, read_info
from tinygen.core.tokenizer import EOT
from tinygen.generate.engine import stream
from tinygen.generate.sampling import SamplingParams

Q = gguf.GGMLQuantizationType
PROMPT = "Once upon a time"

# Every type gguf dequantizes, and so every type the GGUF reader takes
# (test_every_type_gguf_dequantizes_is_here keeps the list whole).
QUANTIZED_BY_GGUF = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0", "MXFP4"]
RANDOM_BLOCKS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
                 "IQ3_S", "IQ4_NL", "IQ4_XS", "NVFP4"]  # gguf cannot quantize these: modelfiles.random_blocks
GGUF_TYPES = QUANTIZED_BY_GGUF + RANDOM_BLOCKS
# (architecture, tensor type, tied embeddings): llama in every type, qwen3 (qk-norm, no q/k permutation) in two.
GGUF_CASES = [("llama", t, False) for t in GGUF_TYPES] + [("qwen3", "Q8_0", True), ("qwen3", "Q4_K", True)]
HF_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
HF_CASES = {  # name -> (model_type, config beyond HF_LLAMA or GPT-2's, how the folder is saved)
    "gpt2-vocab-merges": ("gpt2", {}, "vocab.json + merges.txt"),
    "gpt2-tokenizer-json": ("gpt2", {}, "tokenizer.json"),
    "llama": ("llama", {}, "tokenizer.json"),
    "llama-sharded": ("llama", {}, "sharded"),
    "mistral": ("mistral", {"sliding_window": None}, "tokenizer.json"),
    "qwen2": ("qwen2", {}, "tokenizer.json"),
    "qwen3": ("qwen3", {"head_dim": 16, "tie_word_embeddings": True}, "tokenizer.json"),
}


@pytest.fixture(scope="module")
def cli():
    """conftest's cli, with gguf and pydantic (which typer's option parsing imports) imported once
    in the server rather than in every case."""
    server = ForkServer(preload=("gguf", "pydantic"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory, tokenizer):
    """vocab.json + merges.txt of the trained tokenizer's tokens and <|endoftext|>, the tokenizer of
    every Hugging Face folder here."""
    return write_gpt2_files(tmp_path_factory.mktemp("tokenizer"), tokenizer.ranks)


def assert_samples_at_the_cli(cli, path, net, tok, *flags) -> None:
    """`tinygen sample -m PATH -n 5 -t 0` prints five tokens; with no flags, the library's own greedy ones."""
    r = cli("sample", "-m", path, PROMPT, "-n", "5", "-t", "0", *flags)
    assert_ok(r)
    want = list(stream(net, tok.encode(PROMPT), SamplingParams(temperature=0), 5, stop_ids=tok.stop_ids))
    assert len(want) == 5  # the stop tokens' head rows are zero: nothing ends the text early
    if not flags:
        assert r.text == tok.decode(want)
    assert r.text


def cli_model(path):
    """The model as `tinygen sample -m PATH` loads and prepares it, with no flags."""
    from tinygen.cli.common import load_model as cli_load

    return cli_load(str(path), "cpu").model


def info_at_the_cli(cli, path) -> dict:
    r = cli("info", "-m", path, "--json")
    assert_ok(r)
    return json.loads(r.out)


def finite_logits(net, tok) -> torch.Tensor:
    with torch.no_grad():
        logits = net(torch.tensor([tok.encode(PROMPT)]))
    assert torch.isfinite(logits).all()
    return logits


# -- a tinygen checkpoint ----------------------------------------------------------------------------


def test_a_tinygen_checkpoint(cli, model_path):
    net, tok, info = load_model(model_path)
    assert info.kind == "tinygen"
    finite_logits(net, tok)
    assert_samples_at_the_cli(cli, model_path, net, tok)
    assert info_at_the_cli(cli, model_path)["kind"] == "tinygen"


def test_loading_builds_no_second_copy_and_imports_no_compiler(model_path, gguf_files):
    """The model is built with its parameters on the meta device and takes the loaded tensors as
    they are (no initialisation, no copy): each parameter holds the file's values. Nothing on the way
    imports Dynamo, which torch's meta kernels for normal_ and cat do (a second and 60 MB of start-up):
    checked in a fresh process, for a checkpoint, a float GGUF and a GGUF loaded as stored."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    net = load_model(model_path)[0]
    stored = load_file(str(model_path))
    for name, p in net.named_parameters():
        assert torch.equal(p, stored[name]), name
    code = ("import sys, tinygen.cli.app; from tinygen.core.checkpoint import load_model as load;\n"
            "from tinygen.cli.common import load_model\n"
            f"load({str(model_path)!r}); load({str(gguf_files('llama', 'Q4_K', False))!r})\n"
            f"load_model({str(gguf_files('llama', 'Q5_0', True))!r}, 'cpu').model(__import__('torch').tensor([[1, 2]]))\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr


# -- Hugging Face folders, as transformers saves them ---------------------------------------------------


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory, gpt2_style, tokenizer):
    """Each HF_CASES folder, built on first use."""
    import transformers

    made = {}

    def build(case: str):
        if case in made:
            return made[case]
        kind, config, saved = HF_CASES[case]
        folder = tmp_path_factory.mktemp(case)
        n_vocab = len(tokenizer.ranks) + 1
        if kind == "gpt2":
            torch.manual_seed(0)
            cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=n_vocab)
            model = transformers.GPT2LMHeadModel(cfg).eval()
        else:
            model = transformers_llama(kind, {**HF_LLAMA, **config, "vocab_size": n_vocab})
        with torch.no_grad():  # a zero head row: <|endoftext|> is never the greedy choice
            model.get_output_embeddings().weight[n_vocab - 1] = 0
        model.save_pretrained(folder, **({"max_shard_size": "100KB"} if saved == "sharded" else {}))
        if saved == "vocab.json + merges.txt":
            for name in ("vocab.json", "merges.txt"):
                (folder / name).write_bytes((gpt2_style / name).read_bytes())
        else:
            transformers.GPT2TokenizerFast.from_pretrained(gpt2_style).save_pretrained(folder)
        made[case] = folder, model
        return made[case]

    return build


@pytest.mark.parametrize("case", HF_CASES)
def test_a_hugging_face_folder(cli, hf_folders, case):
    folder, hf = hf_folders(case)
    kind, _, saved = HF_CASES[case]
    assert (folder / "model.safetensors.index.json").exists() == (saved == "sharded")
    assert (folder / "tokenizer.json").exists() == (saved != "vocab.json + merges.txt")
    net, tok, info = load_model(folder)
    assert info.kind == ("gpt2" if kind == "gpt2" else "llama")
    assert info.provenance["source"] == f"Hugging Face {'GPT-2' if kind == 'gpt2' else kind} folder"
    with torch.no_grad():
        want = hf(torch.tensor([tok.encode(PROMPT)])).logits
    torch.testing.assert_close(finite_logits(net, tok), want, rtol=0, atol=1e-5)
    assert_samples_at_the_cli(cli, folder, net, tok)
    shown = info_at_the_cli(cli, folder)
    assert shown["kind"] == info.kind and shown["parameters"] == hf.num_parameters()


# -- GGUF files, in every tensor type ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, tokenizer):
    """A small GGUF of each (arch, type, tied), written on first use, with a byte-level tokenizer: the
    trained tokenizer's tokens and <|endoftext|>. n_embd is 64, or the type's block when that is
    larger (256 for k-quants), so that blocks divide the rows."""
    folder = tmp_path_factory.mktemp("gguf")
    meta = gguf_tokenizer_fields(tokenizer.ranks, [EOT])
    n_vocab = len(tokenizer.ranks) + 1
    made = {}

    def build(arch: str, qtype: str, tied: bool):
        if (arch, qtype, tied) not in made:
            d = max(64, gguf.GGML_QUANT_SIZES[getattr(Q, qtype)][0])
            config, state = tiny_llama(n_layer=2, d=d, n_head=4, n_kv=2, ff=d, vocab=n_vocab, tied=tied,
                                       qk_norm=arch == "qwen3")
            path = folder / f"{arch}-{qtype}{'-tied' if tied else ''}.gguf"
            made[arch, qtype, tied] = write_gguf(path, config, state, getattr(Q, qtype), arch=arch, meta=meta,
                                                 quiet_ids=[n_vocab - 1])
        return made[arch, qtype, tied]

    return build


# GGUF kind -> tinygen's weight; kinds that make one matrix stack as rows in this order.
TOP = {"token_embd": "transformer.wte", "output_norm": "transformer.ln_f", "output": "lm_head"}
IN_BLOCK = {"attn_norm": "ln_1", "ffn_norm": "ln_2", "attn_q": "attn.c_attn", "attn_k": "attn.c_attn",
            "attn_v": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_gate": "mlp.c_fc", "ffn_up": "mlp.c_fc",
            "ffn_down": "mlp.c_proj", "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm"}
STACKED = ["attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"]


def weights_as_gguf_reads_them(path) -> dict[str, torch.Tensor]:
    """tinygen's weights from gguf's own dequantization of each stored tensor: llama's q and k rows
    back in Hugging Face's rotary order (as transformers undoes llama.cpp's permutation), then q, k, v
    and gate, up stacked as tinygen fuses them."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    heads = {"attn_q": reader.fields[f"{arch}.attention.head_count"].contents(),
             "attn_k": reader.fields[f"{arch}.attention.head_count_kv"].contents()} if arch == "llama" else {}
    parts: dict[str, list] = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        *block, kind, _ = t.name.split(".")  # blk.0.attn_q.weight, token_embd.weight
        if kind in heads:
            values = hf_unpermute(values, heads[kind])
        name = f"transformer.h.{block[1]}.{IN_BLOCK[kind]}.weight" if block else f"{TOP[kind]}.weight"
        order = STACKED.index(kind) if kind in STACKED else 0
        parts.setdefault(name, []).append((order, torch.from_numpy(np.array(values, np.float32))))
    return {name: torch.cat([w for _, w in sorted(pieces, key=lambda p: p[0])]) for name, pieces in parts.items()}


@pytest.mark.parametrize("arch, qtype, tied", GGUF_CASES,
                         ids=[f"{a}-{t}{'-tied' if tied else ''}" for a, t, tied in GGUF_CASES])
def test_a_gguf(cli, gguf_files, arch, qtype, tied):
    if not hasattr(Q, qtype):
        pytest.skip(f"this gguf has no {qtype}")
    path = gguf_files(arch, qtype, tied)
    net, tok, info = load_model(path)
    assert info.kind == "gguf" and net.config.qk_norm == (arch == "qwen3") and net.config.tie_embeddings == tied
    want = weights_as_gguf_reads_them(path)
    assert set(want) == set(dict(net.named_parameters()))
    for name, w in net.named_parameters():
        assert torch.equal(w, want[name]), name
    finite_logits(net, tok)
    # The command line runs the file as stored where its type allows (test_kquants.py): the library's
    # model as the command loads it is the one to agree with.
    assert_samples_at_the_cli(cli, path, cli_model(path), tok)
    header = read_info(path)  # what `tinygen info` shows (test_tinygen_info_shows_a_gguf), from the header alone
    assert header.kind == "gguf" and qtype in header.dtypes and header.config == net.config


@pytest.mark.parametrize("arch, qtype, tied", [("llama", "Q4_K", False), ("qwen3", "Q8_0", True)])
def test_tinygen_info_shows_a_gguf(cli, gguf_files, tokenizer, arch, qtype, tied):
    path = gguf_files(arch, qtype, tied)
    shown = info_at_the_cli(cli, path)
    assert shown["kind"] == "gguf" and shown["dtypes"] == sorted({"F32", qtype})
    assert shown["parameters"] == read_info(path).n_params
    assert shown["tokenizer"]["special_tokens"] == {EOT: len(tokenizer.ranks)}


def test_every_type_gguf_dequantizes_is_here():
    def dequantizes(qtype) -> bool:
        _, size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
        except NotImplementedError:
            return False
        return True

    assert {q.name for q in Q if dequantizes(q)} <= set(GGUF_TYPES)


def stored_4bit_matrices(info) -> dict[str, torch.Tensor]:
    """The file's Q4_0/Q4_1 matrices as load_model keeps them for --quantize int4 (by module name),
    dequantized. The one place that knows where the loader keeps them."""
    return {name: m.read().dequantize() for name, m in info.stored.items() if m.form == "int4"}


@pytest.mark.parametrize("qtype, tied", [("Q4_0", False), ("Q4_1", True)])
def test_int4_runs_a_q4_ggufs_own_blocks(cli, gguf_files, qtype, tied):
    path = gguf_files("llama", qtype, tied)
    net, tok, info = load_model(path)
    weights = net.state_dict()  # a tied lm_head.weight is the embedding's
    stored = stored_4bit_matrices(info)
    assert {name for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)} <= set(stored)
    for name, w in stored.items():
        assert torch.equal(w, weights[f"{name}.weight"]), name
    assert_samples_at_the_cli(cli, path, net, tok, "--quantize", "int4")
