"""A NativeBlock's decode step (layerstep.c) computes what core/model.Block computes on the same
modules: layer by layer, from the same input and the same cache, over a generation that wraps a
sliding layer's ring, for a Gemma 3-like layer (post-norms, qk-norm, GeGLU, an attention scalar,
sliding and global layers with their own rotary bases) and a Llama/Qwen-like one (SiLU, grouped-query
attention, q/k/v biases); every other pass is Block's own; plan.prepare swaps it in for a file as
stored, and a layer it cannot compute stays a Block."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from tinygen.core.config import ModelConfig
from tinygen.core.kvcache import CacheSlots, KVCache, window_plan
from tinygen.core.model import Block
from tinygen.core.quantized import INT4, INT8, Int8Blocks, Q4Weight
from tinygen.core.rotary import rotary_angles
from tinygen.generate import native
from tinygen.generate.blockquant import BlockLinear, NativeRMSNorm
from tinygen.generate.engine import decode, prefill
from tinygen.generate.nativeblock import NativeBlock

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler builds the native products here")

WINDOW, SEQ = 8, 30
GEMMA = ModelConfig(n_layer=3, n_head=4, n_kv_head=1, n_embd=64, head_size=32, block_size=64, vocab_size=97,
                    qk_norm=True, mlp="geglu", post_norms=True, embed_scale=True, attn_scalar=24.0, rope_theta=1e5,
                    sliding_window=WINDOW, sliding_layers=(0, 2), rope_local_theta=1e3)
LLAMA = ModelConfig(n_layer=2, n_head=6, n_kv_head=2, n_embd=96, block_size=64, vocab_size=97, qkv_bias=True,
                    tie_embeddings=False)


def int8_blocks(w: torch.Tensor) -> Int8Blocks:
    """w as Q8_0 would store it: int8 codes and a scale per 32 inputs."""
    blocks = w.view(w.size(0), -1, 32)
    scales = blocks.abs().amax(-1) / 127
    return Int8Blocks(torch.round(blocks / scales[..., None]).to(torch.int8).view_as(w), scales)


def q4(w: torch.Tensor) -> Q4Weight:
    """w as Q4_1 would store it: 4-bit codes with a scale and a low per 32 inputs."""
    blocks = w.view(w.size(0), -1, 32)
    low, high = blocks.amin(-1), blocks.amax(-1)
    scales = (high - low) / 15
    return Q4Weight(torch.round((blocks - low[..., None]) / scales[..., None]).to(torch.uint8).view_as(w), scales, low)


def as_stored(config: ModelConfig):
    """A random model whose blocks run on the native products, half the matrices as 4-bit codes and
    half as int8, with native norms and biases where the config has them: each block a NativeBlock."""
    model = make_model(config, scale=3.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
    for i, block in enumerate(model.transformer.h):
        for parent in (block.attn, block.mlp):
            for name in ("c_attn", "c_proj", "c_fc"):
                linear = getattr(parent, name, None)
                if linear is not None:
                    four = (i + len(name)) % 2
                    w = (q4 if four else int8_blocks)(linear.weight.detach())
                    setattr(parent, name, BlockLinear(w, INT4 if four else INT8, linear.bias))
        for parent in (block, block.attn):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.RMSNorm):
                    setattr(parent, name, NativeRMSNorm(child))
        assert NativeBlock.fits(block, config)
        model.transformer.h[i] = NativeBlock(block, config)
    return model.eval()


@pytest.mark.parametrize("config", [GEMMA, LLAMA], ids=["gemma3", "llama-qkv-bias"])
def test_each_layers_step_is_blocks_on_the_same_input_and_cache(config):
    """Teacher-forced past the window: every layer's output and the keys and values it stores are
    Block's, from a cache that held the same before."""
    model = as_stored(config)
    seq = torch.randint(0, config.vocab_size, (SEQ,), generator=torch.Generator().manual_seed(1)).tolist()
    calls = 0
    with torch.inference_mode():
        cache, _ = prefill(model, [seq[:3]], max_len=SEQ)
        for p in range(3, SEQ):
            twin = KVCache(config, 1, "cpu", torch.float32, SEQ)
            twin.copy_from(cache, min(p, SEQ))
            kinds = rotary_angles(model.rope_bits, model.rope_sign, torch.tensor([p]), torch.float32)
            x = torch.randn(1, 1, config.n_embd, generator=torch.Generator().manual_seed(p)) * 3
            for i, block in enumerate(model.transformer.h):
                rope = kinds[-1] if block.sliding else kinds[0]
                window = window_plan(WINDOW, torch.tensor([p]), CacheSlots(cache, torch.tensor([p]), p + 1)) \
                    if block.sliding else None
                got, _ = block(x, rope, CacheSlots(cache, torch.tensor([p]), p + 1), window=window)
                want, _ = Block.forward(block, x, rope, CacheSlots(twin, torch.tensor([p]), p + 1), window=window)
                # The C step sums its floats in another order, and a last-bit difference can move one
                # activation's int8 rounding by a step in a later product: on an AVX2 build (no
                # AVX-512) that left one output 7.4e-4 of the largest away.
                torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-3 * want.abs().max().item())
                for mine, theirs in ((cache.ks[i], twin.ks[i]), (cache.vs[i], twin.vs[i])):
                    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
                x = want
                calls += 1
    assert calls == (SEQ - 3) * config.n_layer


def test_the_step_is_native_and_every_other_pass_is_blocks(monkeypatch):
    model = as_stored(GEMMA)
    steps = []
    original = native.layer_step
    monkeypatch.setattr(native, "layer_step", lambda *a: steps.append(1) or original(*a))
    seq = list(range(1, 12))
    with torch.inference_mode():
        cache, _ = prefill(model, [seq[:5]], max_len=SEQ)  # five tokens: Block's pass
        assert not steps
        decode(model, cache, torch.tensor([seq[5]]), [5])
        assert len(steps) == GEMMA.n_layer
        model.attention(torch.tensor([seq]))  # attention weights: Block's explicit path
        cache2, _ = prefill(model, [seq[:5], seq[:7]], max_len=SEQ)
        decode(model, cache2, torch.tensor([1, 2]), [5, 7])  # two rows: Block's
    assert len(steps) == GEMMA.n_layer


def test_a_file_as_stored_decodes_through_native_blocks(tmp_path, tokenizer):
    """plan.prepare makes each block of a quantized file a NativeBlock, and its greedy tokens are
    those of the same model with Block's step."""
    import gguf
    from modelfiles import gguf_tokenizer_fields, tiny_llama, write_gguf

    from tinygen.core.checkpoint import load_model
    from tinygen.generate import plan
    from tinygen.generate.engine import stream
    from tinygen.generate.sampling import SamplingParams

    path = tmp_path / "m.gguf"
    config, state = tiny_llama(n_layer=2, d=128, n_head=4, n_kv=2, ff=256, vocab=len(tokenizer.ranks) + 1, tied=True)
    write_gguf(path, config, state, gguf.GGMLQuantizationType.Q4_1,
               meta=gguf_tokenizer_fields(tokenizer.ranks, ["<|endoftext|>"]))
    net, tok, info = load_model(path, as_stored=True)
    prepared = plan.prepare(net, stored=info.stored, embedding_rows=info.embedding_rows).model
    assert all(type(b) is NativeBlock for b in prepared.transformer.h)
    prompt = tok.encode("Once upon a time")
    greedy = SamplingParams(temperature=0)
    with torch.inference_mode():
        native_tokens = list(stream(prepared, prompt, greedy, 20))
        monkeypatch = pytest.MonkeyPatch()
        monkeypatch.setattr(NativeBlock, "forward", Block.forward)
        try:
            block_tokens = list(stream(prepared, prompt, greedy, 20))
        finally:
            monkeypatch.undo()
    assert native_tokens == block_tokens


def test_a_layer_it_cannot_compute_stays_a_block():
    config = ModelConfig(n_layer=1, n_head=2, n_embd=64, block_size=16, vocab_size=50, mlp="relu2")
    model = make_model(config)
    assert not NativeBlock.fits(model.transformer.h[0], config)  # float matrices, an ungated MLP
