"""`tinygen bench`: generation and training speed, measured against references in the same process.

Absolute times on shared machines are noise; ratios taken in one run are not. So every figure
comes with a reference measured here and now:
- decode and batched generation against transformers' generate() on identical weights
  (reference.py), with greedy outputs checked to agree;
- decode against the memory-bandwidth roofline: the bytes one token reads (weights and KV
  cache) over the read bandwidth measured on this machine a moment before;
- training against a bare PyTorch loop (nanoGPT-style: forward, cross-entropy, backward, AdamW)
  around the transformers model, and as MFU: against the matmul peak measured here on a CPU, or
  the datasheet peak on a known GPU.
Each figure is the median of several timed repeats after a warm-up.
"""

from __future__ import annotations

import statistics
import time

import torch

from tinygen.core.config import PRESETS, ModelConfig
from tinygen.errors import TinygenError

SECTIONS = ("decode", "batch", "train")
# Datasheet HBM bandwidth, bytes/s, for the GPUs we know (SXM parts; the PCIe H100 is slower).
PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L4": 0.3e12, "4090": 1.0e12}


def shape_config(name: str) -> ModelConfig:
    """A training preset as a full config: GPT-2's vocabulary and architecture for "gpt2", a trained
    8192-token vocabulary and the default architecture for the others."""
    if name not in PRESETS:
        raise TinygenError(f"unknown shape {name!r}; choose from {', '.join(PRESETS)}")
    if name == "gpt2":
        return ModelConfig(**PRESETS[name], vocab_size=50257, arch="gpt2")
    return ModelConfig(**PRESETS[name], vocab_size=8192)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, lazy init
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Clock:
    """A transformers streamer that notes when generate() hands over each new token."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def _decode_rates(stamps: list[float], start: float, n: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s after it) from per-token timestamps."""
    first = stamps[0] - start
    rate = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else float("nan")
    return first, rate


def _build(model: str | None, shape: str | None, device, dtype):
    from tinygen.core.checkpoint import load_model
    from tinygen.core.model import GPT

    if shape is not None:
        config = shape_config(shape)
        torch.manual_seed(0)
        with torch.device(device):
            net = GPT(config)
        return net.to(dtype).eval(), f"{shape} (random weights)"
    net, _, info = load_model(model, device=device, dtype=dtype)
    return net, str(info.path)


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# -- the machine's own ceilings ---------------------------------------------------------------------

def read_bandwidth(device: torch.device) -> float:
    """Bytes/s at which this device reads memory: summing a buffer far larger than any cache."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)  # 1 GiB on a GPU, 256 MiB on a CPU
    x = torch.ones(n, device=device)
    sync = _sync(device)
    seconds = _median_time(lambda: (x.sum(), sync()), 5)
    return n * 4 / seconds


def peak_bandwidth(device: torch.device) -> float | None:
    """The datasheet bandwidth of a known GPU; None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None)


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of a large float32 matmul here: a CPU's practical peak, for MFU where no datasheet applies."""
    a = torch.randn(2048, 2048, device=device)
    sync = _sync(device)
    return 2 * 2048**3 / _median_time(lambda: (a @ a, sync()), 3)


def decode_bytes(net, context: int) -> int:
    """Bytes read to decode one token at this context length: every weight but the embedding
    table (a lookup reads one row), and the KV cache written so far."""
    tensors = [*net.named_parameters(), *net.named_buffers()]
    weights = sum(t.numel() * t.element_size() for name, t in tensors
                  if not name.startswith(("transformer.wte", "transformer.wpe", "rope_")))
    if not any(name.startswith("lm_head") for name, _ in tensors):
        weights += net.transformer.wte.weight.numel() * net.transformer.wte.weight.element_size()  # the tied head
    cfg = net.config
    kv = 2 * cfg.n_layer * context * cfg.n_embd * net.dtype.itemsize
    return weights + kv


# -- generation --------------------------------------------------------------------------------------

def _decode_section(net, hf, prompt, new_tokens, repeats, dev, say, decoder=None) -> dict:
    from tinygen.generate import engine
    from tinygen.generate.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    sync = _sync(dev)
    say("batch-1 decode and prefill")

    def ours_prefill():
        engine._prefill(net, [prompt], dev)
        sync()

    prefill_s = _median_time(ours_prefill, repeats)

    def ours_decode():
        start = time.perf_counter()
        stamps, out = [], []
        for tok in engine.stream(net, prompt, greedy, new_tokens, decoder=decoder):
            stamps.append(time.perf_counter())
            out.append(tok)
        return _decode_rates(stamps, start, new_tokens), out

    ours_decode()  # warm-up
    runs = [ours_decode() for _ in range(repeats)]
    ours = {"prefill_tok_s": len(prompt) / prefill_s,
            "first_token_ms": 1000 * statistics.median(r[0][0] for r in runs),
            "decode_tok_s": statistics.median(r[0][1] for r in runs)}
    section = {"prompt_tokens": len(prompt), "new_tokens": new_tokens, "tinygen": ours}
    if hf is None:
        return section
    from tinygen.bench.reference import hf_greedy

    say("transformers: same weights, generate() greedy")
    ids = torch.tensor([prompt], device=dev)

    def hf_prefill():
        hf(ids, use_cache=True, logits_to_keep=1)  # as generate() does, and as our prefill does
        sync()

    hf_prefill_s = _median_time(hf_prefill, repeats)

    def hf_decode():
        clock = _Clock()
        start = time.perf_counter()
        out = hf_greedy(hf, prompt, new_tokens, streamer=clock)
        return _decode_rates(clock.stamps[1:], start, new_tokens), out  # stamp 0 is the prompt

    hf_decode()
    hf_runs = [hf_decode() for _ in range(repeats)]
    ref = {"prefill_tok_s": len(prompt) / hf_prefill_s,
           "first_token_ms": 1000 * statistics.median(r[0][0] for r in hf_runs),
           "decode_tok_s": statistics.median(r[0][1] for r in hf_runs)}
    section["transformers"] = ref
    section["ratio"] = {"decode": ours["decode_tok_s"] / ref["decode_tok_s"],
                        "prefill": ours["prefill_tok_s"] / ref["prefill_tok_s"],
                        "first_token": ref["first_token_ms"] / ours["first_token_ms"]}
    # Same weights, same greedy rule: the first tokens must agree, or the comparison is void.
    agree = 0
    for a, b in zip(runs[0][1], hf_runs[0][1]):
        if a != b:
            break
        agree += 1
    section["greedy_agreement"] = f"{agree}/{new_tokens} tokens"
    return section


def _batch_section(net, hf, prompt_tokens, new_tokens, batch_sizes, dev, say) -> list[dict]:
    """Generation throughput, prefill included, for batches of distinct prompts of one length."""
    from tinygen.generate import engine
    from tinygen.generate.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    sync = _sync(dev)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for b in batch_sizes:
        say(f"batch {b}: {b} prompts x {new_tokens} new tokens")
        prompts = torch.randint(0, net.config.vocab_size, (b, prompt_tokens), generator=gen)

        def ours():
            engine.generate_batch(net, prompts.tolist(), greedy, new_tokens)
            sync()

        row = {"batch": b, "tinygen_tok_s": b * new_tokens / _median_time(ours, 1)}
        if hf is not None:
            ids = prompts.to(dev)

            def ref():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
                sync()

            row["transformers_tok_s"] = b * new_tokens / _median_time(ref, 1)
            row["ratio"] = row["tinygen_tok_s"] / row["transformers_tok_s"]
        rows.append(row)
    return rows


# -- training ----------------------------------------------------------------------------------------

def _train_section(model, shape, steps, batch_size, compare, dev, peak, say, compile=False) -> dict:
    """The real training loop on random tokens, and (compare) a bare loop around transformers;
    with compile, both are compiled."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from tinygen.core.tokenizer import Tokenizer
    from tinygen.training.loop import Step, TrainSettings, flops_per_token, train

    net, _ = _build(model, shape, torch.device("cpu"), torch.float32)
    cfg = net.config
    fpt = flops_per_token(net)
    say(f"training: batch {batch_size} x {cfg.block_size} tokens, {steps} steps")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=batch_size * (cfg.block_size + 1) * 4,
                                               dtype=np.int64)
    hf = None
    if compare:
        from tinygen.bench.reference import to_transformers

        hf = to_transformers(net)  # before training moves and changes the weights
    settings = TrainSettings(max_steps=steps, batch_size=batch_size, eval_every=10**9, warmup_steps=1, sample_tokens=0,
                             compile=compile)
    # A byte-level stand-in tokenizer: the loop needs one to write its checkpoint.
    stand_in = Tokenizer([bytes([b]) for b in range(256)], r"\S+|\s+", {})
    with tempfile.TemporaryDirectory() as tmp:
        events = list(train(net.train(), stand_in, tokens, tokens[:0], Path(tmp) / "bench.safetensors", settings,
                            device=dev))
    tps = statistics.median(e.tokens_per_s for e in events if isinstance(e, Step) and e.step > 2)
    section = {"batch": [batch_size, cfg.block_size], "steps": steps, "flops_per_token": fpt,
               "tinygen": {"tok_s": tps, "mfu": tps * fpt / peak}}
    if hf is not None:
        say("reference: a bare PyTorch loop around transformers, same weights")
        hf = hf.to(dev).train()
        ref = _bare_loop(torch.compile(hf) if compile else hf, tokens, batch_size, cfg.block_size, steps, dev)
        section["reference"] = {"tok_s": ref, "mfu": ref * fpt / peak}
        section["ratio"] = tps / ref
    return section


def _bare_loop(hf, tokens, batch_size: int, block: int, steps: int, dev) -> float:
    """Tokens/s of nanoGPT's inner loop: batch, forward, loss, backward, clip, AdamW step."""
    import contextlib

    import torch.nn.functional as F

    data = torch.from_numpy(tokens)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=dev.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    sync = _sync(dev)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        ix = torch.randint(len(data) - block - 1, (batch_size,), generator=gen)
        x = torch.stack([data[i : i + block] for i in ix]).to(dev)
        y = torch.stack([data[i + 1 : i + 1 + block] for i in ix]).to(dev)
        with autocast:
            logits = hf(x).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= 2:  # the first two are warm-up, as for tinygen's loop
            times.append(time.perf_counter() - start)
    return batch_size * block / statistics.median(times)


# -- the command ---------------------------------------------------------------------------------------

def run(model=None, shape=None, sections=SECTIONS, prompt_tokens=128, new_tokens=64, repeats=3,
        batch_sizes=(1, 8, 32, 64), batch_new_tokens=32, steps=6, train_batch=8, compare=False, threads=None,
        device="auto", dtype="auto", quantize=None, compile=False, progress=None) -> dict:
    from tinygen.core.device import inference_dtype, resolve_device
    from tinygen.generate.quantize import quantize as quantize_model

    unknown = set(sections) - set(SECTIONS)
    if unknown or not sections:
        raise TinygenError(f"unknown section {', '.join(sorted(unknown)) or '(none)'}; choose from {', '.join(SECTIONS)}")
    if prompt_tokens < 1 or new_tokens < 2 or repeats < 1 or batch_new_tokens < 1:
        raise TinygenError("--prompt-tokens must be >= 1, --new-tokens >= 2 and --repeats >= 1")
    if "train" in sections and steps < 3:
        raise TinygenError("--steps must be at least 3 (the first two are warm-up)")
    if any(b < 1 for b in batch_sizes):
        raise TinygenError("--batch-sizes must be positive")
    if threads:
        torch.set_num_threads(threads)

    def say(msg):
        if progress is not None:
            progress.print(f"[dim]{msg}[/dim]")

    dev = resolve_device(device)
    net, label = _build(model, shape, dev, inference_dtype(dev, dtype))
    cfg = net.config
    longest = prompt_tokens + max(new_tokens, batch_new_tokens)
    if longest > cfg.block_size:
        raise TinygenError(f"prompt + new tokens ({longest}) exceed the context ({cfg.block_size})")
    params = net.num_params()
    hf = None
    if compare and set(sections) & {"decode", "batch"}:
        from tinygen.bench.reference import to_transformers

        hf = to_transformers(net)  # from the float weights, before any quantisation
    quantize_model(net, quantize)
    say(f"{label}: {params / 1e6:.1f}M params on {dev}, {torch.get_num_threads()} threads")
    result = {
        "model": label, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "dtype": str(net.dtype).removeprefix("torch."), "quantize": quantize,
        "threads": torch.get_num_threads(), "params": params,
        "config": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "arch")},
        "torch": torch.__version__, "compile": compile,
    }
    if compare:
        import transformers

        result["transformers_version"] = transformers.__version__
    with torch.inference_mode():
        if "decode" in sections:
            prompt = torch.randint(0, cfg.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
            decoder = None
            if compile:
                from tinygen.generate.compiled import StaticDecoder

                say("compiling the decode step")
                decoder = StaticDecoder(net)
                result["compile_seconds"] = decoder.warm_up()
            section = _decode_section(net, hf, prompt.tolist(), new_tokens, repeats, dev, say, decoder)
            say("memory read bandwidth")
            bandwidth = read_bandwidth(dev)
            per_token = decode_bytes(net, prompt_tokens + new_tokens // 2)
            achieved = per_token * section["tinygen"]["decode_tok_s"]
            section["roofline"] = {"bytes_per_token": per_token, "achieved_bytes_s": achieved,
                                   "measured_bytes_s": bandwidth, "of_measured": achieved / bandwidth}
            if (peak := peak_bandwidth(dev)) is not None:
                section["roofline"].update(peak_bytes_s=peak, of_peak=achieved / peak)
            result["decode"] = section
        if "batch" in sections:
            result["batch"] = {"prompt_tokens": prompt_tokens, "new_tokens": batch_new_tokens,
                               "rows": _batch_section(net, hf, prompt_tokens, batch_new_tokens, batch_sizes, dev, say)}
    if "train" in sections:
        del hf, net  # free their memory for training's
        from tinygen.training.loop import peak_flops

        peak = peak_flops(dev)
        peak_kind = "datasheet bf16"
        if peak is None:
            say("matmul peak")
            peak, peak_kind = matmul_peak(dev), "measured fp32 matmul"
        result["train"] = _train_section(model, shape, steps, train_batch, compare, dev, peak, say, compile)
        result["train"].update(peak_flops=peak, peak_kind=peak_kind)
    return result


def _cpu_name() -> str:
    import os
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"


def print_table(result: dict, console) -> None:
    from rich.table import Table

    cfg = result["config"]
    quant = f" · --quantize {result['quantize']}" if result["quantize"] else ""
    quant += " · --compile" if result.get("compile") else ""
    title = (f"{result['model']} · {result['params'] / 1e6:.1f}M params · {cfg['arch']} · {result['device']} "
             f"{result['dtype']}{quant} · {result['threads']} threads\n{result['device_name']}")
    compared = "transformers_version" in result
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("tinygen", justify="right")
    table.add_column("reference", justify="right")  # the roofline is one even without --compare
    table.add_column("ratio", justify="right", style="bold")

    def row(label, ours, ref=None, ratio=None):
        table.add_row(label, ours, ref or "", f"{ratio:.2f}x" if isinstance(ratio, float) else ratio or "")

    if d := result.get("decode"):
        t, r, q = d["tinygen"], d.get("transformers"), d.get("ratio", {})
        n = f"prompt {d['prompt_tokens']}, {d['new_tokens']} new"
        row(f"decode tok/s, batch 1 ({n})", f"{t['decode_tok_s']:.1f}", r and f"{r['decode_tok_s']:.1f}", q.get("decode"))
        row("time to first token, ms", f"{t['first_token_ms']:.1f}", r and f"{r['first_token_ms']:.1f}",
            q.get("first_token"))
        row("prefill tok/s", f"{t['prefill_tok_s']:.0f}", r and f"{r['prefill_tok_s']:.0f}", q.get("prefill"))
        rl = d["roofline"]
        row(f"decode read bandwidth, GB/s ({rl['bytes_per_token'] / 1e6:.1f} MB/token)",
            f"{rl['achieved_bytes_s'] / 1e9:.1f}", f"{rl['measured_bytes_s'] / 1e9:.1f} measured", f"{rl['of_measured']:.0%}")
        if "peak_bytes_s" in rl:
            row("", "", f"{rl['peak_bytes_s'] / 1e9:.0f} peak", f"{rl['of_peak']:.0%}")
    if b := result.get("batch"):
        for r in b["rows"]:
            row(f"generation tok/s, batch {r['batch']} ({b['new_tokens']} new)", f"{r['tinygen_tok_s']:.0f}",
                f"{r['transformers_tok_s']:.0f}" if "transformers_tok_s" in r else None, r.get("ratio"))
    if tr := result.get("train"):
        t, r = tr["tinygen"], tr.get("reference")
        row(f"training tok/s (batch {tr['batch'][0]} x {tr['batch'][1]})", f"{t['tok_s']:,.0f}",
            r and f"{r['tok_s']:,.0f}", tr.get("ratio"))
        row(f"MFU (of {tr['peak_kind']} peak {tr['peak_flops'] / 1e12:.2f} TFLOP/s)", f"{t['mfu']:.1%}",
            r and f"{r['mfu']:.1%}", None)
    console.print(table)
    notes = []
    if compared:
        notes.append("reference: transformers generate() on the same weights; for training, a bare PyTorch loop "
                     "around the same transformers model")
    if "compile_seconds" in result:
        notes.append(f"compiling the decode step took {result['compile_seconds']:.1f} s (not in the figures)")
    if d and "greedy_agreement" in d:
        notes.append(f"greedy agreement with transformers: {d['greedy_agreement']}")
    if d and d["roofline"]["of_measured"] > 1:
        notes.append("above 100% of the measured bandwidth: the weights fit in the CPU's caches")
    for note in notes:
        console.print(f"[dim]{note}[/dim]")
