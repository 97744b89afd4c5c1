"""`tinygen bench` on Llama-family models made elsewhere: the transformers reference holds the exact
weights for each Llama switch (grouped-query attention, untied head, MLP width, q/k/v biases,
Llama 3 rotary scaling), and a saved Hugging Face folder benches end to end against it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_ok, q8_0_like

from tinygen.core.config import ModelConfig
from tinygen.core.model import GPT

transformers = pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
SWITCHES = {
    "gqa": dict(n_kv_head=2),
    "untied-mlp-width": dict(tie_embeddings=False, mlp_hidden_size=100, norm_eps=1e-6, rope_theta=1e5),
    "qkv-bias": dict(qkv_bias=True, n_kv_head=3),
    "llama3-scaling": dict(rope_scaling=LLAMA3, rope_theta=5e5),
    "all-at-once": dict(n_kv_head=2, tie_embeddings=False, qkv_bias=True, mlp_hidden_size=72, rope_scaling=LLAMA3),
}


def random_llama(seed: int = 0, **switches) -> GPT:
    """A tiny random tinygen model with sharp logits (greedy far from ties) and random gains and
    biases, so that a gain or bias mapped wrongly shows."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=2, n_head=6, n_embd=48, block_size=64, vocab_size=300, **switches))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.5, 0.2) if p.dim() == 1 else p.mul_(3.0)
    return model.eval()


@pytest.mark.parametrize("case", SWITCHES)
def test_the_reference_holds_the_exact_weights_for_each_llama_switch(case):
    from tinygen.bench.reference import hf_greedy, to_transformers
    from tinygen.generate.engine import generate_batch
    from tinygen.generate.sampling import SamplingParams

    model = random_llama(**SWITCHES[case])
    hf = to_transformers(model)
    cfg = model.config
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM")
    assert hf.config.num_key_value_heads == cfg.kv_heads and hf.config.intermediate_size == cfg.mlp_hidden
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == cfg.tie_embeddings
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=0, atol=1e-5)
    prompt = idx[0, :10].tolist()
    assert generate_batch(model, [prompt], SamplingParams(temperature=0), 20)[0] == hf_greedy(hf, prompt, 20)


def test_decode_bytes_count_kv_heads_and_an_untied_head():
    from tinygen.bench.ceilings import cache_bytes, decode_bytes
    from tinygen.generate.plan import prepare

    tied, untied = random_llama(n_kv_head=2), random_llama(n_kv_head=2, tie_embeddings=False)
    matrix = 300 * 48 * 4  # the token table: read again as a tied head, or the untied head's own matrix
    body = sum(p.numel() * 4 for n, p in tied.named_parameters() if not n.startswith("transformer.wte"))
    kv_per_slot = 2 * 2 * 2 * 8 * 4  # keys and values, 2 layers, 2 kv heads of 8 dims, float32
    assert decode_bytes(tied, 10) == body + matrix + 10 * kv_per_slot
    assert decode_bytes(untied, 10) == decode_bytes(tied, 10)  # the same bytes, read from another matrix
    assert cache_bytes(tied.config, 3, torch.float32) == 3 * 64 * kv_per_slot  # the whole context, per row
    assert cache_bytes(tied.config, 3, torch.float32, 10) == 3 * 10 * kv_per_slot
    int8 = decode_bytes(prepare(untied, "int8").model, 10)
    assert int8 < decode_bytes(tied, 10) / 3  # int8 matrices and their scales; the lookup table is not read



def test_decode_bytes_count_a_sliding_layers_window_only():
    from conftest import make_model

    from tinygen.bench.ceilings import decode_bytes
    from tinygen.core.config import ModelConfig

    config = ModelConfig(n_layer=3, n_head=2, n_kv_head=1, n_embd=32, block_size=64, vocab_size=50,
                         sliding_window=4, sliding_layers=(0, 2))
    model = make_model(config)
    kv_per_slot = 2 * 16 * 4  # keys and values of one kv head of 16 dims, float32
    assert decode_bytes(model, 10) - decode_bytes(model, 1) == (4 + 10 + 4 - 3) * kv_per_slot

def test_decode_bytes_count_a_matrix_kept_as_int8_blocks_as_its_codes():
    """A compiled CPU step reads a Q8_0 matrix's int8 codes and per-32 scales, not its float32 copy."""
    from tinygen.bench.ceilings import decode_bytes
    from tinygen.generate.fastlinear import SplitLinear

    net = random_llama()
    mlp = net.transformer.h[0].mlp
    mlp.c_proj.weight.data.copy_(q8_0_like(48, 128))  # as a GGUF's Q8_0 matrix loads
    before = decode_bytes(net, 10)
    mlp.c_proj = SplitLinear(mlp.c_proj)
    assert decode_bytes(net, 10) == before  # nothing kept: the float32 weight is what is read
    assert mlp.c_proj.keep_int8_blocks()
    assert decode_bytes(net, 10) == before - 48 * 128 * 4 + 48 * 128 + 48 * 4 * 4


def llama_folder(folder: Path, config: dict) -> Path:
    """A transformers model saved with a byte-level tokenizer.json of the 256 bytes (no merges)."""
    from tinygen.core.tokenizer import unicode_to_byte

    kind = "Qwen2" if config.pop("qwen2", False) else "Llama"
    torch.manual_seed(0)
    hf = getattr(transformers, f"{kind}ForCausalLM")(getattr(transformers, f"{kind}Config")(**config))
    hf.save_pretrained(folder)
    vocab = {ch: b for ch, b in unicode_to_byte().items()}
    (folder / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": [],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "decoder": {"type": "ByteLevel"}}))
    return folder


@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory) -> Path:
    return llama_folder(tmp_path_factory.mktemp("llama"), dict(
        hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        max_position_embeddings=2048, vocab_size=300, tie_word_embeddings=False,
        rope_theta=5e5, rope_scaling=LLAMA3))


BENCH = ["--device", "cpu", "--prompt-tokens", "16", "--new-tokens", "8", "--repeats", "1"]


def test_bench_compares_a_saved_llama_folder_with_transformers(gqa_folder, cli):
    r = cli("bench", "-m", gqa_folder, "--compare", "--only", "decode", "--json", *BENCH, timeout=120)
    assert_ok(r)
    result = json.loads(r.out)
    assert result["config"]["n_kv_head"] == 2 and result["config"]["tie_embeddings"] is False
    decode = result["decode"]
    assert decode["greedy_agreement"] == "8/8 tokens"
    assert decode["transformers"]["decode_tok_s"] > 0 and decode["ratio"]["decode"] > 0
    # Every weight but the lookup table, the untied head included, and the keys and values of 2 kv heads.
    params = result["params"]
    assert decode["roofline"]["bytes_per_token"] == (params - 300 * 48) * 4 + 2 * 2 * 20 * 2 * 8 * 4
    # The engine's cache holds the prompt and the new tokens, not the 2,048-token context.
    assert decode["cache_bytes_per_row"] == 2 * 2 * 2 * (16 + 8) * 8 * 4
    assert "skipped" not in result  # --only decode asked for nothing else


def test_bench_of_an_imported_model_leaves_training_out_unless_asked(gqa_folder, cli):
    r = cli("bench", "-m", gqa_folder, "--batch-sizes", "1,2", "--batch-new-tokens", "4", *BENCH, timeout=120)
    assert_ok(r)
    assert "generation tok/s, batch 2" in r.out and "training tok/s" not in r.out
    assert "skipped train: not timed by default for an imported model" in " ".join(r.out.split())
    r = cli("bench", "-m", gqa_folder, "--only", "train", "--compare", "--json", "--steps", "3", "--train-batch", "1",
            *BENCH, timeout=120)
    assert_ok(r)
    train = json.loads(r.out)["train"]
    # Windows of at most 1,024 tokens, not the model's 2,048.
    assert train["batch"] == [1, 1024] and train["tinygen"]["tok_s"] > 0 and train["reference"]["tok_s"] > 0


def test_batches_whose_cache_would_not_fit_are_skipped_with_the_reason(monkeypatch):
    from tinygen.bench import bench as bench_lib

    # SmolLM2-135M's shape: 30 layers, 3 kv heads of 64 dims, 8,192 tokens of context.
    config = ModelConfig(n_layer=30, n_head=9, n_embd=576, block_size=8192, n_kv_head=3, vocab_size=300)
    cpu = torch.device("cpu")
    monkeypatch.setattr(bench_lib, "free_memory", lambda dev: 23 * 10**9)
    skipped = {}
    assert bench_lib._fitting([1, 8, 32, 64], config, torch.float32, cpu, skipped, 8192) == [1, 8]
    assert list(skipped) == ["batch 32", "batch 64"]
    assert "24.2 GB (377 MB a row, for 8,192 tokens) of the 23.0 GB free" in skipped["batch 64"]
    # The rows a bench generates hold only their prompt and new tokens: 64 of them fit.
    assert bench_lib._fitting([1, 64], config, torch.float32, cpu, {}, 128 + 32) == [1, 64]
    monkeypatch.setattr(bench_lib, "free_memory", lambda dev: None)  # cannot tell: every size is tried
    assert bench_lib._fitting([1, 64], config, torch.float32, cpu, {}, 8192) == [1, 64]
