"""A decoder block whose batch-1 decode step is one native call (layerstep.c, through native.py):
plan.py swaps it in for each Block of a model loaded as stored on a CPU, where every matrix of the
block runs on the native products.

A decode step of a small model is bound by how many operations it dispatches, not by arithmetic:
core/model.Block runs twenty-odd tensor operations a layer, and each costs more to dispatch than to
compute at batch 1. Here a layer is one call, and every other pass (a prefill, several rows, the
attention weights asked for, a compiled step, value embeddings) is Block's own, with the same
modules and the same numbers but for float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from tinygen.core.config import ModelConfig
from tinygen.core.model import Block
from tinygen.generate import native
from tinygen.generate.blockquant import BlockLinear, NativeRMSNorm


class NativeBlock(Block):
    """A Block with the same modules (and names), and a native decode step."""

    def __init__(self, block: Block, config: ModelConfig):
        nn.Module.__init__(self)
        self._modules = dict(block._modules)
        self._parameters = dict(block._parameters)
        self._buffers = dict(block._buffers)
        self.sliding, self.post_norms = block.sliding, block.post_norms
        self.gelu = config.mlp == "geglu"
        self.index = block.attn.layer
        self._apply(lambda t: t)

    @staticmethod
    def fits(block: Block, config: ModelConfig) -> bool:
        """Whether layerstep.c computes this block: the rope family's gated MLP, every matrix on the
        native products, every norm a float32 RMSNorm of one epsilon."""
        attn, mlp = block.attn, block.mlp
        matrices = (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
        norms = [block.ln_1, block.ln_2, *((block.attn_post_norm, block.mlp_post_norm) if block.post_norms else ()),
                 *((attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else ())]
        return (config.arch == "rope" and mlp.gated and not config.value_embeds and native.library() is not None
                and all(type(m) is BlockLinear and (m.bias is None or m.bias.dtype == torch.float32) for m in matrices)
                and all(type(n) is NativeRMSNorm and n.weight.dtype == torch.float32 for n in norms)
                and len({n.eps for n in norms}) == 1)

    def _apply(self, fn, recurse=True):
        """After any move of the weights, the addresses that the native step reads."""
        super()._apply(fn, recurse)
        self.layer = self._layer()
        return self

    def _layer(self) -> native.Layer:
        attn, mlp = self.attn, self.mlp
        post = (self.attn_post_norm, self.mlp_post_norm) if self.post_norms else (None, None)
        qk = (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else (None, None)
        return native.Layer(
            *(_matrix(m) for m in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)),
            *(None if n is None else n.weight.data_ptr() for n in (self.ln_1, self.ln_2, *post, *qk)),
            attn.n_head, attn.n_kv_head, attn.head_dim, mlp.c_proj.in_features, self.gelu,
            self.ln_1.eps, attn.scale or attn.head_dim ** -0.5)

    def forward(self, x, rope=None, slots=None, need_weights=False, ve=None, window=None, hook=None):
        # One token of one row, reading every slot it reaches (no mask): then it sits at position
        # kv_len - 1 (kvcache.CacheSlots), and a sliding layer reads its ring up to there.
        if (x.shape[:2] == (1, 1) and slots is not None and slots.mask is None and rope is not None
                and not need_weights and ve is None and hook is None and (window is None or window.mask is None)
                and x.dtype == torch.float32 and not torch.compiler.is_compiling()):
            k, v = slots.cache.ks[self.index], slots.cache.vs[self.index]
            if k.dtype == torch.float32 and k.is_contiguous() and v.is_contiguous():
                cos, sin = rope
                return native.layer_step(self.layer, x.contiguous(), cos, sin, k, v, slots.kv_len), None
        return super().forward(x, rope, slots, need_weights, ve, window, hook)


def _matrix(layer: BlockLinear) -> native.Matrix:
    kind, codes, scales, lows, block, n = layer.matrix
    bias = None if layer.bias is None else layer.bias.data_ptr()
    return native.Matrix(kind, block, n, layer.in_features, codes, scales, lows or None, bias)
