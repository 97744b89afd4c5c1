"""The transformer: a decoder-only GPT in two families, "rope" (the default) and "gpt2".

Token ids go in and logits come out. Attention runs through scaled_dot_product_attention (flash
kernels on GPU), or through an explicit path that also returns the attention probabilities for
visualisation. Module names follow GPT-2's so that Hugging Face GPT-2 weights map one to one. The
rope family's switches (config.py) cover the Llama family and Gemma 3, whose sliding-window layers
take their window from the positions of each pass (kvcache.window_plan), so callers pass positions
as for any model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygen.core.config import ModelConfig
from tinygen.core.kvcache import CacheSlots, KVCache, Window, window_plan  # noqa: F401 (KVCache: re-exported)
from tinygen.core.rotary import apply_rotary, frequency_bits, rotary_angles, rotary_sign

# Where a hook sees the forward pass, as (point, layer): the residual stream entering block `layer`
# ("resid"; layer n_layer is what the final norm reads, layer 0 the embeddings), each head's output
# before the heads are mixed ("z", (B, T, n_head, head_dim)), and what the attention and the MLP add
# to the residual stream ("attn", "mlp"; after the post-norms of a model that has them). The names
# are TransformerLens's: resid_pre, z, attn_out, mlp_out.
HOOK_POINTS = ("resid", "z", "attn", "mlp")
Hook = Callable[[str, int, torch.Tensor], torch.Tensor]

# torch 2.5 taught SDPA grouped-query attention; before it, k and v are repeated to every query head.
_SDPA_GQA = torch.__version__ >= "2.5"  # TorchVersion compares as a version, not as a string


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        bias = config.arch == "gpt2"
        self.layer = layer
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        # q, k, v in one matmul: n_head query heads, then kv_heads key heads and as many value heads.
        width = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, width, bias=bias or config.qkv_bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=bias)
        self.dropout = config.dropout
        self.scale = None if config.attn_scalar is None else config.attn_scalar ** -0.5  # None: SDPA's 1/sqrt(D)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)

    def forward(self, x, rope=None, slots: CacheSlots | None = None, need_weights: bool = False,
                ve: torch.Tensor | None = None, window: Window | None = None, hook: Hook | None = None):
        """window: a sliding layer's reads, writes and mask in this pass, in place of slots'.
        hook: sees (and may replace) each head's output, "z" (B, T, H, D), before c_proj mixes them."""
        B, T, _ = x.shape
        H, G, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x).view(B, T, H + 2 * G, D).transpose(1, 2)  # (B, H+2G, T, D): q, k, v heads
        # split, not slicing: its backward joins the parts' gradients in one concatenation, where each
        # slice's backward would zero a full-size tensor and the parts would then be added.
        qk, v = qkv.split((H + G, G), dim=1)  # query heads then key heads; value heads
        if hasattr(self, "q_norm"):
            # Normed before rotary, which keeps norms: a query-key product can then never exceed
            # the gains times the head size, whatever the weights grow to (Qwen3, modded-nanogpt).
            qk = self.norm_heads(qk)
        if ve is not None:  # (B, T, G*D): this block's value embedding of each token, one part per kv head
            v = v + ve.view(B, T, G, D).transpose(1, 2)
        if rope is not None:
            qk = apply_rotary(qk, *rope)  # q and k heads rotate by the same angles, so one call covers both
        q, k = qk.split((H, G), dim=1)
        mask = None
        if window is not None:
            mask = window.mask
            if slots is not None:
                k, v = slots.cache.slide(self.layer, window, k, v)  # (B, H, S, D), S: what the window reads
        elif slots is not None:
            k, v = slots.cache.update(self.layer, slots.pos, slots.kv_len, k, v)  # (B, H, kv_len, D)
            mask = slots.mask
        att = None
        if G != H and (need_weights or not _SDPA_GQA):
            # Each key/value head serves H // G query heads, which sit next to each other.
            k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        if need_weights:
            # The explicit path: the same math as SDPA, keeping the probabilities.
            scores = (q @ k.transpose(-2, -1)) * (self.scale or D ** -0.5)  # (B, H, T, S)
            if mask is None:
                S = k.size(2)
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)  # no peeking ahead
            att = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = att @ v  # (B, H, T, D)
        else:
            # No dropout on the attention probabilities: it forces SDPA off its fused kernels onto
            # a path that materialises (B, H, T, T), several times slower; residual dropout below
            # regularises small-data training well enough.
            # is_causal aligns its mask top-left, so a single query must not use it: it would see key 0 only.
            gqa = {"enable_gqa": True} if G != H and _SDPA_GQA else {}
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               scale=self.scale, **gqa)
        y = y.transpose(1, 2)  # (B, T, H, D)
        if hook is not None:
            y = hook("z", self.layer, y)
        y = self.c_proj(y.reshape(B, T, H * D))
        if self.training and self.dropout:
            y = F.dropout(y, self.dropout)
        return y, att

    def norm_heads(self, qk: torch.Tensor) -> torch.Tensor:
        """q_norm on the query heads and k_norm on the key heads of qk (B, H+G, T, D), in one norm: the
        same numbers as two norms on a split and a concatenation, in a third of the operations (a
        batch-1 decode step is bound by how many small operations it runs)."""
        H, G, D = self.n_head, self.n_kv_head, qk.size(-1)
        gains = torch.cat((self.q_norm.weight.expand(H, D), self.k_norm.weight.expand(G, D)))  # (H+G, D)
        return F.rms_norm(qk, (D,), None, self.q_norm.eps) * gains[:, None]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.arch == "rope" and config.mlp in (None, "geglu")
        # GeGLU (Gemma) gates with GELU's tanh form where SwiGLU uses SiLU.
        self.act = partial(F.gelu, approximate="tanh") if config.mlp == "geglu" else F.silu
        self.relu2 = config.mlp == "relu2"
        bias = config.arch == "gpt2"
        hidden = config.mlp_hidden
        # SwiGLU packs gate and up projections into one matmul.
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.gated else hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=bias)
        self.dropout = config.dropout

    def forward(self, x):
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        elif self.relu2:  # modded-nanogpt's: sparse like ReLU, smooth at zero, cheaper than a gate
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        h = self.c_proj(h)
        return F.dropout(h, self.dropout) if self.training and self.dropout else h


def make_norm(config: ModelConfig) -> nn.Module:
    if config.arch == "gpt2":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps)
    return nn.RMSNorm(config.n_embd, eps=config.norm_eps)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). With post-norms (Gemma),
    each output is normed again before the residual adds it."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        self.sliding = config.is_sliding(layer)  # attends within the window (kvcache.window_plan)
        self.post_norms = config.post_norms
        if config.post_norms:
            self.attn_post_norm = make_norm(config)
            self.mlp_post_norm = make_norm(config)

    def forward(self, x, rope=None, slots=None, need_weights=False, ve=None, window=None, hook=None):
        a, att = self.attn(self.ln_1(x), rope, slots, need_weights, ve, window, hook)
        a = self.attn_post_norm(a) if self.post_norms else a
        if hook is not None:
            a = hook("attn", self.attn.layer, a)
        x = x + a
        m = self.mlp(self.ln_2(x))
        m = self.mlp_post_norm(m) if self.post_norms else m
        if hook is not None:
            m = hook("mlp", self.attn.layer, m)
        return x + m, att


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=make_norm(config),
            )
        )
        if config.arch == "gpt2":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.value_embeds:
            self.transformer["ve"] = nn.ModuleList(nn.Embedding(config.vocab_size, config.kv_heads * config.head_dim)
                                                   for _ in range(config.value_embeds))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied: one matrix reads and writes tokens
        self.drop = nn.Dropout(config.dropout)
        self.init_buffers()
        if init:  # loading a checkpoint overwrites every weight, so it skips this
            init_weights(self)

    def init_buffers(self, device=None) -> None:
        """Make the buffers derived from the config (float32, on `device` or the default one). Not
        persistent, so never stored in checkpoints: a model whose buffers were made on the meta
        device makes them again with this."""
        config = self.config
        if config.arch == "rope":
            self.register_buffer("rope_bits", frequency_bits(config, device), persistent=False)
            self.register_buffer("rope_sign", rotary_sign(config, device), persistent=False)
        if config.embed_scale:
            # A buffer, so that model.to(dtype) rounds the factor to the model's dtype as transformers'
            # Gemma does (its sqrt(n_embd) times bfloat16 embeddings is the bfloat16 of the factor).
            factor = torch.tensor(math.sqrt(config.n_embd), device=device)
            self.register_buffer("embed_factor", factor, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.transformer.ln_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype: the final norm's gain is a float weight in every model, whatever
        the embedding and the linear layers are stored as."""
        return self.transformer.ln_f.weight.dtype

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once

    def hidden(self, idx, slots: CacheSlots | None = None, need_weights: bool = False, hook: Hook | None = None,
               start: tuple[int, torch.Tensor] | None = None):
        """Final-norm hidden states (B, T, C) for token ids idx (B, T).

        Without slots, positions are 0..T-1 and attention is plainly causal. With them, the
        tokens sit at slots.pos, their keys and values go into slots.cache there, and attention
        reads the cache's first slots.kv_len slots under slots.mask; a sliding layer reads its ring
        as kvcache.window_plan says.
        hook(point, layer, activation) sees and may replace each activation on its way (HOOK_POINTS);
        without one, the pass runs exactly as it would with no hooks in the code. start: (layer, the
        residual stream (B, T, C) entering it) runs the blocks from there on, for an experiment that
        only changes that layer and later ones (TransformerLens's start_at_layer).
        Returns (hidden, attention probabilities per layer, or None).
        """
        B, T = idx.shape
        cfg = self.config
        pos = slots.pos if slots is not None else torch.arange(T, device=idx.device)  # (T,) or (B, T)
        first, x = start if start is not None else (0, self.embed(idx, pos))  # (B, T, C)
        rope = local_rope = None  # the global layers' (cos, sin), the sliding layers'
        if cfg.arch == "rope":
            # The last kind is the sliding layers': their own base's when they have one, else the global.
            kinds = rotary_angles(self.rope_bits, self.rope_sign, pos, x.dtype)
            rope, local_rope = kinds[0], kinds[-1]
        window = window_plan(cfg.sliding_window, pos, slots) if cfg.sliding_window else None
        atts = [] if need_weights else None
        ves = [table(idx) for table in self.transformer.ve] if cfg.value_embeds else []
        for i, block in enumerate(self.transformer.h):
            if i < first:
                continue
            table = cfg.value_table(i) if ves else None
            ve = None if table is None else ves[table]
            if hook is not None:
                x = hook("resid", i, x)
            if block.sliding:
                x, att = block(x, local_rope, slots, need_weights, ve, window, hook)
            else:
                x, att = block(x, rope, slots, need_weights, ve, None, hook)
            if need_weights:
                atts.append(att)
        if hook is not None:
            x = hook("resid", cfg.n_layer, x)
        return self.transformer.ln_f(x), atts

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The residual stream's start (B, T, C): token embeddings (scaled, in Gemma), plus GPT-2's
        learned positions."""
        x = self.transformer.wte(idx)
        if self.config.embed_scale:
            x = x * self.embed_factor
        if self.config.arch == "gpt2":
            x = x + self.transformer.wpe(pos)
        return self.drop(x)

    def forward(self, idx, targets=None):
        """Logits (B, T, V); with targets (B, T), the mean next-token cross-entropy instead.

        Targets of -1 are ignored, which is how padding and masked tokens stay out of the loss.
        """
        h, _ = self.hidden(idx)
        logits = self.head(h)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states: the output head, then the soft cap if the model has one."""
        logits = self.lm_head(h)
        cap = self.config.logit_softcap
        if cap is None:
            return logits
        # In float32: tanh saturates early in bf16. Capping keeps a small model from buying confidence
        # with ever larger logits (Gemma 2, modded-nanogpt).
        return (cap * torch.tanh(logits.float() / cap)).to(logits.dtype)

    def attention(self, idx):
        """Logits and per-layer attention probabilities [(B, H, T, T)] through the explicit path."""
        h, atts = self.hidden(idx, need_weights=True)
        return self.head(h), atts


@torch.no_grad()
def init_weights(model: GPT) -> None:
    """GPT-2's initialisation: N(0, 0.02), with residual projections scaled down by depth so the
    residual stream's variance does not grow with the number of blocks."""
    std = 0.02
    for name, p in model.named_parameters():
        if p.dim() == 1:
            if name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)  # norm gains
        elif name.endswith("c_proj.weight"):
            p.normal_(0.0, std / math.sqrt(2 * model.config.n_layer))
        else:
            p.normal_(0.0, std)
