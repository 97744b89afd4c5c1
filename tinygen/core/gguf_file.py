"""GGUF files (llama.cpp's and ollama's format) read into Hugging Face Llama form: a config dict in
LlamaConfig keys and a state dict with Hugging Face names, so that llama.py maps GGUF files and
Hugging Face folders the same way. Two architectures: llama, and qwen3 (Llama with an RMSNorm on
each query and key head).

The gguf package (llama.cpp's gguf-py) parses and dequantizes; this module names, checks and
converts tensor by tensor from its memory map. llama.cpp's converter changes llama weights in one
way, permuting the rows of q and k for its rotary layout, and that is undone here (qwen3's rotary
kernel pairs Hugging Face's halves as they are, so its weights are not permuted). A metadata switch that
would change the math beyond plain Llama is refused by name, never ignored. gguf and numpy are
imported only when a file is read, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinygen.errors import TinygenError

MAGIC = b"GGUF"
Q8_0_BLOCK = 32  # weights per Q8_0 block; each block is a float16 scale and 32 int8 values (34 bytes)
Q4_BLOCK = 32  # weights per Q4_0/Q4_1 block: a float16 scale (and Q4_1's float16 minimum), then 16 bytes of codes

# GGUF name -> Hugging Face name, for the tensors outside the blocks.
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",  # Llama 3 rope scaling: becomes config["rope_scaling"], not a weight
}
# Within block i: blk.i.<GGUF> -> model.layers.i.<Hugging Face>. Biases are optional, as in llama.cpp.
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # qwen3 only
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
QK_NORMS = ("attn_q_norm.weight", "attn_k_norm.weight")
REQUIRED_LAYER = [k for k in LAYER_NAMES if k.endswith(".weight") and k not in QK_NORMS]
# The architectures read, and what each has beyond Llama's tensors.
ARCHITECTURES = {"llama": (), "qwen3": QK_NORMS}
BLOCK = re.compile(r"blk\.(\d+)\.(.+)")

# <arch>.* keys this module reads, or that describe the file without changing the math.
KNOWN_KEYS = {
    "block_count", "context_length", "embedding_length", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.freq_base", "rope.dimension_count",
    "rope.scaling.finetuned", "rope.scaling.original_context_length", "tensor_data_layout",
}
# <arch>.* switches that llama.cpp honours: harmless only at these values (MoE, other rope scalings,
# softcapping, scaled attention or logits, sliding windows, non-causal attention).
NEUTRAL = {
    "expert_count": (0,), "expert_used_count": (0,), "expert_shared_count": (0,),
    "rope.scaling.type": ("none", "linear"), "rope.scaling.factor": (0.0, 1.0), "rope.scale_linear": (1.0,),
    "rope.scaling.attn_factor": (1.0,), "attention.causal": (True,), "attention.scale": (0.0,),
    "attention.sliding_window": (0,), "attention.clamp_kqv": (0.0,), "attn_logit_softcapping": (0.0,),
    "final_logit_softcapping": (0.0,), "logit_scale": (1.0,), "embedding_scale": (1.0,),
    "residual_scale": (1.0,), "use_parallel_residual": (False,),
}
# convert_hf_to_gguf.py writes Llama 3 rope scaling only as the rope_freqs tensor. It reads the
# original context from the top of config.json, where Llama 3.x keeps none, so it always uses 8192.
LLAMA3_ORIGINAL_CONTEXT = 8192


@dataclass
class Q8_0Weight:
    """A Q8_0 weight as stored, for an int8 path: weight ≈ qweight * scale of its 32-input block."""

    qweight: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out, in // 32) float16

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, n_in = self.qweight.shape
        blocks = self.qweight.reshape(out, -1, Q8_0_BLOCK).to(torch.float32)
        return (blocks * self.scales.to(torch.float32)[..., None]).reshape(out, n_in).to(dtype)


@dataclass
class Q4Weight:
    """A Q4_0 or Q4_1 weight as stored: weight = q * scale + low over each block of 32 inputs
    (Q4_1 stores the block's minimum as low; Q4_0, symmetric, has low = -8 * scale). The codes
    unpacked, one 0..15 per uint8, so rows can be fused and permuted like any weight's."""

    q: torch.Tensor  # (out, in) uint8, 0..15
    scales: torch.Tensor  # (out, in // 32) float16
    lows: torch.Tensor  # (out, in // 32) float16, or float32 for Q4_0 (-8 * scale, exact)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, n_in = self.q.shape
        # Groups as wide as the scales say: 32 from a file, any width from quantize's Int4Linear.
        blocks = self.q.reshape(out, self.scales.size(1), -1).to(torch.float32)
        w = blocks * self.scales.to(torch.float32)[..., None] + self.lows.to(torch.float32)[..., None]
        return w.reshape(out, n_in).to(dtype)


@dataclass
class ConversionReport:
    """What read_gguf converted, for stderr and for tests."""

    counts: dict[str, dict[str, int]]  # tensor kind (attn_q, token_embd, ...) -> GGUF type name -> tensors
    bytes_in: int  # tensor data in the file
    bytes_out: int  # the tensors returned (q8_0 ones at their int8 size)
    seconds: float  # parsing and converting
    dtype: torch.dtype

    def by_type(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for types in self.counts.values():
            for name, n in types.items():
                totals[name] = totals.get(name, 0) + n
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def lines(self) -> list[str]:
        return [f"{kind}: " + ", ".join(name if n == 1 else f"{name} x{n}" for name, n in types.items())
                for kind, types in self.counts.items()]

    def summary(self) -> str:
        n = sum(self.by_type().values())
        types = ", ".join(f"{name} x{k}" for name, k in self.by_type().items())
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"converted {n} tensors ({types}; {_mb(self.bytes_in)}) to {dtype} ({_mb(self.bytes_out)}) "
                f"in {self.seconds:.1f} s")


@dataclass
class GGUFModel:
    """A llama or qwen3 GGUF in Hugging Face form."""

    config: dict  # LlamaConfig keys (model_type "llama" or "qwen3")
    tensors: dict[str, torch.Tensor]  # Hugging Face names, q and k in Hugging Face's rotary layout
    fields: dict  # every metadata key (general.*, tokenizer.*, llama.*, ...) as plain Python values
    report: ConversionReport
    rope_freqs: torch.Tensor | None = None  # llama.cpp's per-frequency divisors; config has them as rope_scaling
    q8_0: dict[str, Q8_0Weight] = field(default_factory=dict)  # with keep_q8_0: these are not in tensors
    q4: dict[str, Q4Weight] = field(default_factory=dict)  # with keep_q4: as stored, besides their tensors


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32, keep_q8_0: bool = False,
              keep_q4: bool = False) -> GGUFModel:
    """Read a llama- or qwen3-architecture GGUF. Every tensor is dequantized into `dtype`, except that with
    `keep_q8_0` the Q8_0 matrices stay int8 (in GGUFModel.q8_0). With `keep_q4` the Q4_0 and Q4_1
    matrices are also kept as stored (GGUFModel.q4), for an int4 path that runs the file's own
    numbers. Problems are TinygenErrors."""
    from gguf import GGMLQuantizationType, dequantize

    start = time.perf_counter()
    if not dtype.is_floating_point:
        raise TinygenError(f"GGUF weights convert to a floating-point dtype, not {dtype}")
    path = Path(path)
    reader = _open(path)
    where = path.name
    fields = _fields(reader, where)
    config = _config(fields, where)
    plan = _plan(reader.tensors, config, where)

    counts: dict[str, dict[str, int]] = {}
    tensors: dict[str, torch.Tensor] = {}
    q8_0: dict[str, Q8_0Weight] = {}
    q4: dict[str, Q4Weight] = {}
    bytes_in = bytes_out = 0
    rope_freqs = None
    for t, hf_name, heads in plan:
        qtype = t.tensor_type
        kind = BLOCK.sub(r"\2", t.name).removesuffix(".weight")
        counts.setdefault(kind, {})
        counts[kind][qtype.name] = counts[kind].get(qtype.name, 0) + 1
        bytes_in += int(t.n_bytes)
        if keep_q8_0 and qtype == GGMLQuantizationType.Q8_0 and len(t.shape) == 2:
            q = _q8_0(t.data)
            if heads:
                q = Q8_0Weight(_unpermute(q.qweight, heads), _unpermute(q.scales, heads))
            q8_0[hf_name] = q
            bytes_out += q.qweight.nbytes + q.scales.nbytes
            continue
        if keep_q4 and qtype in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1) and len(t.shape) == 2:
            q4w = _q4(t.data, qtype == GGMLQuantizationType.Q4_1)
            q4[hf_name] = Q4Weight(*(_unpermute(x, heads) for x in (q4w.q, q4w.scales, q4w.lows))) if heads else q4w
        try:
            values = dequantize(t.data, qtype)
        except NotImplementedError:
            raise TinygenError(f"{where}: tensor {t.name} is {qtype.name}, which the gguf package cannot "
                               "dequantize; upgrade gguf or use a file in another quant type") from None
        if not values.flags.writeable:
            values = values.copy()  # F32 comes back as a view of the read-only memory map
        # rope_freqs stays float32: the rope scaling is read back from its exact values.
        weight = torch.from_numpy(values).to(torch.float32 if hf_name == "rope_freqs" else dtype)
        weight = weight.reshape(_hf_shape(t))
        if heads:
            weight = _unpermute(weight, heads)
        bytes_out += weight.nbytes
        if hf_name == "rope_freqs":
            rope_freqs = weight
        else:
            tensors[hf_name] = weight
    if rope_freqs is not None and (scaling := _llama3_scaling(rope_freqs, config, where)):
        config["rope_scaling"] = scaling
    report = ConversionReport(counts, bytes_in, bytes_out, time.perf_counter() - start, dtype)
    return GGUFModel(config, tensors, fields, report, rope_freqs, q8_0, q4)


@dataclass
class GGUFHeader:
    """What a GGUF says about itself, without dequantizing a weight: for `tinygen info` and tokenize."""

    config: dict  # LlamaConfig keys, as read_gguf gives them
    fields: dict
    tensors: dict[str, tuple[tuple[int, ...], str]]  # Hugging Face name -> (shape, GGUF type name)


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The config, metadata and tensor types of a GGUF; only rope_freqs (a few hundred floats,
    which hold Llama 3's rope scaling) is read from the tensor data."""
    from gguf import dequantize

    path = Path(path)
    reader = _open(path)
    fields = _fields(reader, path.name)
    config = _config(fields, path.name)
    tensors = {}
    for t, hf_name, _ in _plan(reader.tensors, config, path.name):
        if hf_name == "rope_freqs":
            freqs = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).to(torch.float32)
            if scaling := _llama3_scaling(freqs, config, path.name):
                config["rope_scaling"] = scaling
            continue
        tensors[hf_name] = (_hf_shape(t), t.tensor_type.name)
    return GGUFHeader(config, fields, tensors)


def _open(path: Path):
    """The gguf reader of `path`, or a TinygenError that says what is wrong with the file."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise TinygenError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except IsADirectoryError:
        raise TinygenError(f"{path} is a folder; pass the .gguf file inside it") from None
    except OSError as e:
        raise TinygenError(f"cannot read {path}: {e.strerror or e}") from None
    if head != MAGIC:
        raise TinygenError(f"{path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r})")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - a damaged file fails inside gguf in many ways
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "GGMLQuantizationType" in reason:
            raise TinygenError(f"{path} holds a tensor type the installed gguf package does not know ({reason}); "
                               "upgrade gguf") from None
        raise TinygenError(f"{path} is truncated or damaged (gguf: {reason}); download it again") from None
    if reader.byte_order != "I":
        raise TinygenError(f"{path} is a big-endian GGUF; tinygen reads little-endian ones")
    return reader


def _fields(reader, where: str) -> dict:
    """All metadata but the header counts, as plain Python values."""
    fields = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            fields[key] = f.contents()
        except UnicodeDecodeError:
            raise TinygenError(f"{where}: metadata {key} is not valid UTF-8; the file is damaged") from None
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise TinygenError(f"{where}: architecture {arch!r} is not supported; tinygen reads "
                           f"{' and '.join(ARCHITECTURES)} GGUFs")
    if fields.get("split.count", 1) != 1:
        raise TinygenError(f"{where} is one part of a split GGUF; merge the parts with "
                           "`llama-gguf-split --merge` first")
    return fields


def _config(fields: dict, where: str) -> dict:
    """LlamaConfig keys from the <arch>.* metadata; refuses switches that plain Llama does not have."""
    arch = fields["general.architecture"]
    meta = {k.removeprefix(arch + "."): v for k, v in fields.items() if k.startswith(arch + ".")}
    for key, value in meta.items():
        if key in NEUTRAL and value not in NEUTRAL[key]:
            raise TinygenError(f"{where}: {arch}.{key} = {value!r} is not supported; tinygen runs plain Llama "
                               "(no mixture of experts, no rope scaling but Llama 3's, no softcapping)")
        if key not in NEUTRAL and key not in KNOWN_KEYS:
            raise TinygenError(f"{where}: metadata {arch}.{key} = {value!r} is not supported; tinygen does not "
                               "know how it changes the model")

    def need(key: str, kind: type = int, default=None):
        value = meta.get(key, default)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer array that is the same in every layer
        if value is None:
            raise TinygenError(f"{where} has no {arch}.{key}; it is not a complete {arch} GGUF")
        number = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        if not number or value < 0:
            raise TinygenError(f"{where}: {arch}.{key} = {value!r} is not supported (expected one {kind.__name__})")
        return kind(value)

    n_embd, n_head = need("embedding_length"), need("attention.head_count")
    n_kv_head = need("attention.head_count_kv", default=n_head)
    if n_head == 0 or n_kv_head == 0 or n_head % n_kv_head:
        raise TinygenError(f"{where}: {n_head} query heads cannot share {n_kv_head} key/value heads")
    head_dim = need("attention.key_length") if "attention.key_length" in meta else None
    dim = head_dim or n_embd // n_head  # as Hugging Face derives it when head_dim is absent
    if (rotary := need("rope.dimension_count", default=dim)) != dim:
        raise TinygenError(f"{where}: rotary embeddings on {rotary} of each head's {dim} dimensions are not "
                           "supported; tinygen rotates whole heads")
    if need("attention.value_length", default=dim) != dim:
        raise TinygenError(f"{where}: values of a head size apart from the keys' ({dim}) are not supported")
    config = {
        "model_type": arch, "hidden_act": "silu",
        "hidden_size": n_embd,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon", float),
        "rope_theta": need("rope.freq_base", float, 10000.0),  # llama.cpp's default
        "max_position_embeddings": need("context_length"),
        "vocab_size": meta.get("vocab_size"),  # _plan takes it from token_embd when absent
    }
    if head_dim is not None:
        config["head_dim"] = head_dim
    return config


def _plan(gguf_tensors, config: dict, where: str) -> list:
    """(GGUF tensor, Hugging Face name, heads to unpermute by or 0) for each tensor, in file order.
    Completes config (vocab_size, tie_word_embeddings, biases) and checks every shape against it."""
    by_name = {t.name: t for t in gguf_tensors}
    n_layer, arch = config["num_hidden_layers"], config["model_type"]
    extra = ARCHITECTURES[arch]
    if "token_embd.weight" not in by_name:
        raise TinygenError(f"{where} has no token_embd.weight; it is not a complete {arch} GGUF")
    if config["vocab_size"] is None:
        config["vocab_size"] = _hf_shape(by_name["token_embd.weight"])[0]
    config["tie_word_embeddings"] = "output.weight" not in by_name
    config["attention_bias"] = any(BLOCK.fullmatch(n) and ".attn_" in n and n.endswith(".bias") for n in by_name)
    config["mlp_bias"] = any(BLOCK.fullmatch(n) and ".ffn_" in n and n.endswith(".bias") for n in by_name)
    shapes = _shapes(config)

    plan = []
    for t in gguf_tensors:
        block = BLOCK.fullmatch(t.name)
        # llama.cpp's qwen3 applies no rope_freqs, so in such a file it would mean nothing.
        if t.name in TOP_NAMES and (t.name != "rope_freqs.weight" or arch == "llama"):
            hf_name, heads = TOP_NAMES[t.name], 0
            expected = shapes[hf_name]
        elif (block and block[2] in LAYER_NAMES and int(block[1]) < n_layer
              and (block[2] not in QK_NORMS or block[2] in extra)):
            suffix = LAYER_NAMES[block[2]]
            hf_name, expected = f"model.layers.{block[1]}.{suffix}", shapes[suffix]
            # convert_hf_to_gguf.py permutes llama's q by the query heads and k by the key/value heads.
            heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(
                block[2].split(".")[0], 0) if arch == "llama" else 0
        else:
            raise TinygenError(f"{where}: tensor {t.name} is not part of a {n_layer}-layer {arch} model; tinygen "
                               "does not know what it does")
        if _hf_shape(t) != expected:
            raise TinygenError(f"{where}: tensor {t.name} has shape {_hf_shape(t)} but the metadata makes it "
                               f"{expected}; the file is inconsistent")
        plan.append((t, hf_name, heads))
    missing = [n for n in ["token_embd.weight", "output_norm.weight"] if n not in by_name]
    missing += [f"blk.{i}.{s}" for i in range(n_layer) for s in (*REQUIRED_LAYER, *extra)
                if f"blk.{i}.{s}" not in by_name]
    if missing:
        raise TinygenError(f"{where} lacks {len(missing)} tensor(s) of a {n_layer}-layer {arch} model "
                           f"({', '.join(missing[:3])}); the file is incomplete")
    return plan


def _shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """The Hugging Face shape of each weight, by name (per-layer ones by their suffix)."""
    d, ff, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = c.get("head_dim") or d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    return {
        "model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d),
        "rope_freqs": (head_dim // 2,),
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q), "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (d,),
        "mlp.gate_proj.weight": (ff, d), "mlp.up_proj.weight": (ff, d), "mlp.down_proj.weight": (d, ff),
        "mlp.gate_proj.bias": (ff,), "mlp.up_proj.bias": (ff,), "mlp.down_proj.bias": (d,),
        "self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,),
    }


def _hf_shape(t) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute: within each head it interleaves the two
    rotary halves (rows i and i + head_dim/2 become neighbours); Hugging Face keeps them apart.
    Rows only, so it applies to weights, biases and per-row quant scales alike."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _q8_0(data) -> Q8_0Weight:
    import numpy as np

    rows = data.shape[0]
    blocks = data.reshape(rows, -1, 2 + Q8_0_BLOCK)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    qweight = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, -1)
    return Q8_0Weight(torch.from_numpy(qweight), torch.from_numpy(scales))


def _q4(data, with_min: bool) -> Q4Weight:
    """ggml's block_q4_1 {half d; half m; uint8 qs[16]} or block_q4_0 {half d; uint8 qs[16]}: byte j
    holds input j of the block in its low nibble and input j + 16 in its high one."""
    import numpy as np

    rows = data.shape[0]
    head = 4 if with_min else 2
    blocks = data.reshape(rows, -1, head + Q4_BLOCK // 2)
    halves = np.ascontiguousarray(blocks[..., :head]).view(np.float16)  # (rows, n_blocks, 1 or 2)
    packed = blocks[..., head:]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)
    scales = torch.from_numpy(np.ascontiguousarray(halves[..., 0]))
    lows = torch.from_numpy(np.ascontiguousarray(halves[..., 1])) if with_min else -8 * scales.float()
    return Q4Weight(torch.from_numpy(np.ascontiguousarray(q)), scales, lows)


def _llama3_scaling(rope_freqs: torch.Tensor, config: dict, where: str) -> dict | None:
    """Hugging Face's llama3 rope_scaling that gives llama.cpp's per-frequency divisors, or None when
    they are all 1. llama.cpp stores only the divisors: they fix factor, and the smooth band between
    fixes low_freq_factor and high_freq_factor given the original context (8192, as the converter
    assumes). The result is checked by recomputing the divisors, so a file it does not fit is refused."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    divisors = rope_freqs.double()
    if torch.all(divisors == 1):
        return None
    inv_freq = config["rope_theta"] ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(divisors.max())
    low, high, context = 1.0, 4.0, LLAMA3_ORIGINAL_CONTEXT  # Llama 3's values, when the band is too narrow
    refused = TinygenError(f"{where}: rope_freqs.weight is not Llama 3 rope scaling; tinygen knows no other "
                           "per-frequency scaling")
    band = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if int(band.sum()) >= 2:
        # Within the band 1/divisor = (1 - s)/factor + s with s = (context/wavelen - low) / (high - low):
        # s is a line in context/wavelen, whose slope and intercept give high and low.
        s = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
        x = context / wavelen[band]
        slope = float(((x - x.mean()) * (s - s.mean())).sum() / ((x - x.mean()) ** 2).sum())
        if not slope > 0:
            raise refused
        low = round(float(x.mean() - s.mean() / slope), 4)
        high = round(low + 1 / slope, 4)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": context}
    if not torch.allclose(_llama3_divisors(wavelen, scaling), divisors, rtol=1e-4, atol=0):
        raise refused
    return scaling


def _llama3_divisors(wavelen: torch.Tensor, s: dict) -> torch.Tensor:
    """convert_hf_to_gguf.py's rope_freqs for these llama3 parameters."""
    context, low, high, factor = (s["original_max_position_embeddings"], s["low_freq_factor"],
                                  s["high_freq_factor"], s["factor"])
    smooth = (context / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < context / high, 1.0, torch.where(wavelen > context / low, factor, mid))


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} kB"
