"""`tinygen bench`: generation and training speed, measured against references in the same process.

Absolute times on shared machines are noise; ratios taken in one run are less so. So every figure
comes with a reference measured here and now:
- decode and batched generation against transformers' generate() on identical weights
  (reference.py), with greedy outputs checked to agree (generation.py);
- decode against the memory-bandwidth roofline: the bytes one token reads (weights and KV
  cache) over the read bandwidth measured on this machine a moment before (ceilings.py);
- training against a bare PyTorch loop (nanoGPT-style: forward, cross-entropy, backward, AdamW)
  around the transformers model, and as MFU: against a known GPU's datasheet peak, or else the
  matmul peak measured here (training.py, ceilings.py);
- decode under a JSON schema against the same rows unconstrained, with the time the mask takes
  (structured.py). Only when asked for (--only structured): it needs llguidance and a model's
  vocabulary, and measures a feature's cost rather than the plain speed the other sections do.
Each figure is the median of several repeats after a warm-up, ours and the reference timed in
turn; each ratio comes with the range of its per-repeat ratios (measure.py), which says how far
a busy machine has moved it.
"""

from __future__ import annotations

import json

import torch

from tinygen.bench.ceilings import (
    cache_bytes,
    decode_bytes,
    decode_context,
    flops_ceiling,
    free_memory,
    read_bandwidth,
)
from tinygen.bench.generation import batch_section, chat_section, decode_section
from tinygen.bench.hardware import datasheet
from tinygen.bench.structured import structured_section
from tinygen.bench.training import train_section
from tinygen.core.config import PRESETS, ModelConfig
from tinygen.errors import TinygenError

SECTIONS = ("decode", "batch", "chat", "train")  # the default
OPT_IN = ("structured",)  # run only when --only names them
CHAT_TURNS = 5
# Kinds of model file whose training bench leaves out unless asked for: Llama-family models made
# elsewhere, far larger than what tinygen trains on a CPU.
IMPORTED = ("llama", "gguf")
TRAIN_WINDOW = 1024  # the longest training window bench times (GPT-2's context)
# A ratio whose per-repeat values differ by more than this factor cannot be told from noise.
WIDE_SPREAD = 1.25


def shape_config(name: str) -> ModelConfig:
    """A training preset as a full config: GPT-2's vocabulary and architecture for "gpt2", a trained
    8192-token vocabulary and the default architecture for the others."""
    if name not in PRESETS:
        raise TinygenError(f"unknown shape {name!r}; choose from {', '.join(PRESETS)}")
    if name == "gpt2":
        return ModelConfig(**PRESETS[name], vocab_size=50257, arch="gpt2")
    return ModelConfig(**PRESETS[name], vocab_size=8192)


def _build(model: str | None, shape: str | None, device, dtype, as_stored: bool = False):
    """(model, its label, the kind of file it came from: None for a shape's random weights, its
    ModelInfo, whose stored matrices the decode plan reads, and its tokenizer; the last three None
    for a shape). as_stored: a quantized file's matrices as it stores them, as `sample` loads it by
    default on a CPU."""
    from tinygen.core.checkpoint import load_model
    from tinygen.core.model import GPT

    if shape is not None:
        config = shape_config(shape)
        torch.manual_seed(0)
        with torch.device(device):
            net = GPT(config)
        return net.to(dtype).eval(), f"{shape} (random weights)", None, None, None
    net, tokenizer, info = load_model(model, device=device, dtype=dtype, as_stored=as_stored)
    return net, str(info.path), info.kind, info, tokenizer


def _training_net(model: str | None, shape: str | None):
    """The model to train, in float32 on the CPU (training moves it), without dropout, and with its
    context cut to TRAIN_WINDOW tokens.

    The reference model has no dropout (Llama has none, and the GPT-2 one is built without), so
    ours trains without it too: drawing dropout masks is a difference of settings, not of loops.
    Training reads windows of the whole context, and an imported model's (8,192 tokens for
    SmolLM2) would make one step of batch 8 take minutes and gigabytes of logits."""
    from dataclasses import replace

    from tinygen.core.model import GPT

    net = _build(model, shape, torch.device("cpu"), torch.float32)[0]
    if net.config.block_size <= TRAIN_WINDOW and net.config.dropout == 0:
        return net
    short = GPT(replace(net.config, block_size=min(net.config.block_size, TRAIN_WINDOW), dropout=0.0), init=False)
    # Rotary tables are derived from the config; learned positions (gpt2) keep their first rows.
    short.load_state_dict({k: v[:TRAIN_WINDOW] if k == "transformer.wpe.weight" else v
                           for k, v in net.state_dict().items()})
    return short


def run(model=None, shape=None, sections=None, prompt_tokens=128, new_tokens=64, repeats=3,
        batch_sizes=(1, 8, 32, 64), batch_new_tokens=32, steps=6, train_batch=8, compare=False, threads=None,
        device="auto", dtype="auto", quantize=None, compile=False, say=lambda message: None) -> dict:
    """The figures of the sections asked for, as a JSON-ready dict; say(message) hears of progress.
    sections=None runs every section that applies: an imported model's training only when asked
    for. What was left out, and why, is under "skipped"."""
    from tinygen.core.device import inference_dtype, resolve_device
    from tinygen.generate import plan

    unknown = set(sections or SECTIONS) - set(SECTIONS + OPT_IN)
    if unknown or (sections is not None and not sections):
        raise TinygenError(f"unknown section {', '.join(sorted(unknown)) or '(none)'}; "
                           f"choose from {', '.join(SECTIONS + OPT_IN)}")
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device, plan.cpu_only(quantize))
    # What `sample` decodes with: a quantized file as stored on a CPU unless a --dtype is named.
    as_stored = dev.type == "cpu" and dtype == "auto"
    net, label, kind, info, tokenizer = _build(model, shape, dev, inference_dtype(dev, dtype), as_stored)
    cfg = net.config
    skipped = {}
    if sections is None:
        sections = _default_sections(net, kind, skipped)
    longest = prompt_tokens + max(new_tokens, batch_new_tokens)
    if longest > cfg.block_size:
        raise TinygenError(f"prompt + new tokens ({longest}) exceed the context ({cfg.block_size})")
    params = net.num_params()
    hf = None
    if compare and set(sections) & {"decode", "batch"}:
        hf = _reference(model, shape, dev, net if not (info and info.stored and as_stored) else None, skipped)
    stored, rows = (info.stored, info.embedding_rows) if info else ({}, None)
    prepared = plan.prepare(net, quantize, compile and "decode" in sections, stored, rows)  # what `sample` decodes with
    net = prepared.model
    say(f"{label}: {params / 1e6:.1f}M params on {dev}, {torch.get_num_threads()} threads")
    result = _heading(label, net, cfg, params, dev, quantize, repeats, compile, compare)
    if as_stored and info and info.stored:
        result["stored"] = f"{len(info.stored)} matrices as the file stores them"
    with torch.inference_mode():
        if "decode" in sections:
            result["decode"] = _decode(net, hf, prepared.decoder, result, skipped, say, label=label, kind=kind,
                                       compare=compare, dev=dev, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                                       repeats=repeats)
        if "batch" in sections:
            sizes = _fitting(batch_sizes, cfg, net.dtype, dev, skipped, prompt_tokens + batch_new_tokens)
            rows = batch_section(net, hf, prompt_tokens, batch_new_tokens, sizes, repeats, dev, say)
            result["batch"] = {"prompt_tokens": prompt_tokens, "new_tokens": batch_new_tokens, "rows": rows}
        if "chat" in sections:
            result["chat"] = chat_section(net, CHAT_TURNS, repeats, dev, say)
        if "structured" in sections and _can_constrain(tokenizer, skipped):
            # Two generations at a time (with the schema and without): twice the slots a row.
            sizes = _fitting(batch_sizes, cfg, net.dtype, dev, skipped, 2 * (prompt_tokens + new_tokens))
            result["structured"] = structured_section(net, tokenizer, prompt_tokens, new_tokens, sizes, repeats, say)
    if "train" in sections:
        del hf, net, prepared  # free their memory for training's
        result["train"] = _train(model, shape, dev, dtype, steps, repeats, train_batch, compare, compile, say)
    if skipped:
        result["skipped"] = skipped
    return result


def _reference(model, shape, dev, net, skipped: dict):
    """transformers' model on the float weights, before any quantisation (loaded again where net,
    loaded as stored, has none to give: net None); None, and why in skipped, where it has no such model."""
    from tinygen.bench.reference import FAMILIES, to_transformers

    if net is None:
        net = _build(model, shape, dev, torch.float32)[0]
    cfg = net.config
    if cfg.arch != "gpt2" and cfg.family not in FAMILIES:
        skipped["transformers"] = f"the transformers reference maps {', '.join(FAMILIES)} models, not {cfg.family}"
        return None
    return to_transformers(net)


def _can_constrain(tokenizer, skipped: dict) -> bool:
    """Whether the structured section can run: a vocabulary to constrain, and llguidance (if not, why, in skipped)."""
    from tinygen.generate.constrain import require

    if tokenizer is None:
        skipped["structured"] = "a shape's random weights have no vocabulary to write JSON with; -m MODEL has one"
        return False
    try:
        require()
    except TinygenError as e:
        skipped["structured"] = str(e)
        return False
    return True


def _default_sections(net, kind: str | None, skipped: dict) -> tuple[str, ...]:
    """Every section, but training for an imported model only when asked for (the reason goes into skipped)."""
    if kind not in IMPORTED:
        return SECTIONS
    skipped["train"] = (f"not timed by default for an imported model ({net.num_params() / 1e6:.1f}M params); "
                        f"--only train times it, on windows of at most {TRAIN_WINDOW:,} tokens")
    return tuple(s for s in SECTIONS if s != "train")


def _heading(label: str, net, cfg: ModelConfig, params: int, dev, quantize, repeats: int, compile: bool,
             compare: bool) -> dict:
    """What was measured, and where: the model as prepared to decode, the machine and the versions."""
    result = {
        "model": label, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "dtype": str(net.dtype).removeprefix("torch."), "quantize": quantize,
        "threads": torch.get_num_threads(), "params": params, "repeats": repeats,
        "config": json.loads(cfg.to_json()),  # the shape, and the Llama switches that are not at their defaults
        "torch": torch.__version__, "compile": compile,
    }
    if compare:
        import transformers

        result["transformers_version"] = transformers.__version__
    return result


def _decode(net, hf, decoder, result: dict, skipped: dict, say, *, label: str, kind: str | None, compare: bool,
            dev, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """The decode section: batch-1 decode and prefill (generation.py), then the KV cache a row
    allocates and the memory-bandwidth roofline. A compiled step's compile time and cache length
    go into result."""
    prompt = torch.randint(0, net.config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
    if decoder is not None:
        say("compiling the decode step")
        result["compile_seconds"] = decoder.warm_up()
    llama = _llama_cpp(label, kind, compare, dev, prompt_tokens + new_tokens, skipped, say)
    section = decode_section(net, hf, prompt.tolist(), new_tokens, repeats, dev, say, decoder, llama)
    if decoder is not None:
        result["compile_cache_slots"] = decoder.max_len  # the whole context, or sized to the request
    del llama  # its weights and context, before the bandwidth is measured
    # What each prefill allocates (and zeroes); a StaticDecoder holds its own, allocated once.
    section["cache_bytes_per_row"] = cache_bytes(net.config, 1, net.dtype,
                                                 decoder.max_len if decoder else prompt_tokens + new_tokens)
    section["roofline"] = _roofline(net, dev, decode_context(prompt_tokens, new_tokens, decoder),
                                    section["tinygen"]["decode_tok_s"], say)
    return section


def _roofline(net, dev, context: int, tok_s: float, say) -> dict:
    """The bytes one decoded token reads, at the rate measured, against the read bandwidth measured
    now (and a known device's datasheet)."""
    say("memory read bandwidth")
    bandwidth = read_bandwidth(dev)
    per_token = decode_bytes(net, context)
    achieved = per_token * tok_s
    roofline = {"bytes_per_token": per_token, "achieved_bytes_s": achieved,
                "measured_bytes_s": bandwidth, "of_measured": achieved / bandwidth}
    if (sheet := datasheet(dev)) is not None:
        roofline.update(peak_bytes_s=sheet.bandwidth, of_peak=achieved / sheet.bandwidth,
                        peak_kind=f"datasheet ({sheet.name})")
    return roofline


def _train(model, shape, dev, dtype, steps: int, repeats: int, train_batch: int, compare: bool, compile: bool,
           say) -> dict:
    """The training section, against the matmul peak of the dtype it computes in."""
    from tinygen.training.precision import training_dtype

    compute = training_dtype(dev, dtype)
    peak, peak_kind = flops_ceiling(dev, compute, say)
    net = _training_net(model, shape)
    section = train_section(net, steps, repeats, train_batch, compare, dev, peak, say, compile, compute)
    section.update(peak_flops=peak, peak_kind=peak_kind, dtype=str(compute).removeprefix("torch."))
    return section


def _llama_cpp(path: str, kind: str | None, compare: bool, dev, n_ctx: int, skipped: dict, say):
    """llama.cpp on the same file, for a GGUF under --compare on a CPU; None (and why, in skipped)
    when it cannot run."""
    from tinygen.bench import llamacpp

    if not compare or kind != "gguf":
        return None
    if dev.type != "cpu":
        skipped["llama.cpp"] = "compared on a CPU only (llama-cpp-python's wheel is a CPU build)"
        return None
    if not llamacpp.available():
        skipped["llama.cpp"] = (f"llama-cpp-python is not installed; `{llamacpp.INSTALL}` (it builds llama.cpp, "
                                "about 15 minutes on 2 cores) adds llama.cpp on the same file")
        return None
    say("loading the same file in llama.cpp")
    return llamacpp.LlamaCpp(path, torch.get_num_threads(), n_ctx)


def _fitting(batch_sizes, cfg, dtype, dev, skipped: dict, slots: int) -> list[int]:
    """The batch sizes whose KV cache, of slots positions a row, fits in half the memory free now;
    the others go into skipped."""
    free = free_memory(dev)
    fits = []
    for b in batch_sizes:
        need = cache_bytes(cfg, b, dtype, slots)
        if free is not None and need > free / 2:
            skipped[f"batch {b}"] = (f"its KV cache would take {need / 1e9:.1f} GB ({cache_bytes(cfg, 1, dtype, slots) / 1e6:,.0f} "
                                     f"MB a row, for {slots:,} tokens) of the {free / 1e9:.1f} GB free")
        else:
            fits.append(b)
    return fits


def wide_spreads(result: dict, limit: float = WIDE_SPREAD) -> list[tuple[str, list[float]]]:
    """The ratios whose per-repeat values range wider than limit (largest over smallest), by name."""
    spreads = [(name.replace("_", " "), spread)
               for name, spread in result.get("decode", {}).get("spread", {}).items()]
    spreads += [(f"{name.replace('_', ' ')} vs llama.cpp", spread)
                for name, spread in result.get("decode", {}).get("llama_cpp", {}).get("spread", {}).items()]
    spreads += [(f"batch {row['batch']}", row["spread"]) for row in result.get("batch", {}).get("rows", [])
                if "spread" in row]
    spreads += [(f"JSON schema, batch {row['batch']}", row["spread"])
                for row in result.get("structured", {}).get("rows", [])]
    if "spread" in result.get("chat", {}):
        spreads.append(("chat turn 5", result["chat"]["spread"]))
    if "spread" in result.get("train", {}):
        spreads.append(("training", result["train"]["spread"]))
    return [(name, s) for name, s in spreads if s[1] > limit * s[0]]


def _cpu_name() -> str:
    import os
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"
