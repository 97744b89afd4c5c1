"""The transformer: attention paths agree, the mask is causal, shapes follow the config, and it learns."""

import pytest
import torch

from tinygen.core.config import ModelConfig
from tinygen.core.model import GPT
from tinygen.errors import TinygenError

from conftest import make_model


@pytest.mark.parametrize("arch", ["rope", "gpt2"])
def test_explicit_attention_matches_sdpa(arch):
    config = ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=32, vocab_size=101, arch=arch)
    model = make_model(config)
    idx = torch.randint(0, 101, (3, 20))
    with torch.no_grad():
        fast = model(idx)
        slow, atts = model.attention(idx)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-4)
    assert len(atts) == config.n_layer
    for att in atts:
        assert att.shape == (3, config.n_head, 20, 20)
        assert torch.allclose(att.sum(-1), torch.ones(3, config.n_head, 20), atol=1e-5)
        # No weight on the future: everything above the diagonal is exactly zero.
        assert att.triu(diagonal=1).abs().max().item() == 0.0


def test_attention_is_causal_in_outputs():
    """Changing a later token must not change earlier logits."""
    model = make_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    a = torch.randint(0, 50, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 50
    with torch.no_grad():
        la, lb = model(a), model(b)
    assert torch.allclose(la[0, :8], lb[0, :8], atol=1e-6)
    assert not torch.allclose(la[0, 8:], lb[0, 8:])


@pytest.mark.parametrize("arch", ["rope", "gpt2"])
def test_parameter_count_counts_the_tied_head_once(arch):
    config = ModelConfig(n_layer=3, n_head=4, n_embd=96, block_size=40, vocab_size=333, arch=arch)
    model = GPT(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied head
    stored = sum(v.numel() for k, v in model.state_dict().items() if k != "lm_head.weight")
    assert model.num_params() == stored


def test_default_arch_has_no_biases_and_uses_rmsnorm():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=20))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert isinstance(model.transformer.ln_f, torch.nn.RMSNorm)
    assert "wpe" not in model.transformer


@pytest.mark.parametrize("bad", [dict(n_embd=30, n_head=4), dict(arch="llama"), dict(n_layer=0), dict(n_embd=12, n_head=4)])
def test_config_rejects_bad_shapes(bad):
    with pytest.raises(TinygenError):
        ModelConfig(**{**dict(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=20), **bad})


def test_gradient_descent_learns_next_token():
    """Cross-entropy falls when the model is trained on a repeating sequence."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=12)).train()
    seq = torch.arange(12).repeat(3)[:17]
    x, y = seq[:-1][None], seq[1:][None]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(x, y).item()
    for _ in range(60):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.0 and loss.item() < 0.2


def test_ignore_index_masks_targets():
    model = make_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=20))
    x = torch.randint(0, 20, (1, 8))
    y = torch.randint(0, 20, (1, 8))
    masked = y.clone()
    masked[0, :4] = -1
    with torch.no_grad():
        logits = model(x)
        expected = torch.nn.functional.cross_entropy(logits[0, 4:], y[0, 4:])
        assert torch.allclose(model(x, masked), expected, atol=1e-6)
