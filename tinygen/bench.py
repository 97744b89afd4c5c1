"""`tinygen bench`: decode and prefill speed, measured against transformers in the same process.

Absolute times on shared machines are noise; ratios taken in one run are not. Every figure is
the median of several timed repeats after a warm-up, and the compared models hold identical
weights (reference.py), with greedy outputs checked to agree.
"""

from __future__ import annotations

import statistics
import time

import torch

from tinygen.config import ModelConfig
from tinygen.errors import TinygenError

def shape_config(name: str) -> ModelConfig:
    """A training preset as a full config: GPT-2's vocabulary and architecture for "gpt2", a trained
    8192-token vocabulary and the default architecture for the others."""
    from tinygen.train import PRESETS

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
    from tinygen.checkpoint import load_model
    from tinygen.model import GPT

    if shape is not None:
        config = shape_config(shape)
        torch.manual_seed(0)
        with torch.device(device):
            net = GPT(config)
        return net.to(dtype).eval(), f"{shape} (random weights)"
    net, _, info = load_model(model, device=device, dtype=dtype)
    return net, str(info.path)


@torch.inference_mode()
def run(model=None, shape=None, prompt_tokens=128, new_tokens=64, repeats=3, compare=False,
        threads=None, device="auto", dtype="auto", progress=None) -> dict:
    from tinygen import engine
    from tinygen.sampling import SamplingParams

    if threads:
        torch.set_num_threads(threads)
    if prompt_tokens < 1 or new_tokens < 2 or repeats < 1:
        raise TinygenError("--prompt-tokens must be >= 1, --new-tokens >= 2 and --repeats >= 1")
    dev = engine.resolve_device(device)
    net, label = _build(model, shape, dev, engine.inference_dtype(dev, dtype))
    cfg = net.config
    if prompt_tokens + new_tokens > cfg.block_size:
        raise TinygenError(f"prompt + new tokens ({prompt_tokens + new_tokens}) exceed the context ({cfg.block_size})")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy = SamplingParams(temperature=0)

    def say(msg):
        if progress is not None:
            progress.print(f"[dim]{msg}[/dim]")

    say(f"tinygen: {label}, {net.num_params() / 1e6:.1f}M params on {dev}, {torch.get_num_threads()} threads")

    def ours_prefill():
        engine._prefill(net, [prompt], dev)
        sync()

    prefill_s = _median_time(ours_prefill, repeats)

    def ours_decode():
        start = time.perf_counter()
        stamps, out = [], []
        for tok in engine.stream(net, prompt, greedy, new_tokens):
            stamps.append(time.perf_counter())
            out.append(tok)
        return _decode_rates(stamps, start, new_tokens), out

    ours_decode()  # warm-up
    runs = [ours_decode() for _ in range(repeats)]
    ours_tokens = runs[0][1]
    result = {
        "model": label,
        "device": str(dev),
        "dtype": str(net.lm_head.weight.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "params": net.num_params(),
        "config": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "arch")},
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "tinygen": {
            "prefill_tok_s": prompt_tokens / prefill_s,
            "first_token_ms": 1000 * statistics.median(r[0][0] for r in runs),
            "decode_tok_s": statistics.median(r[0][1] for r in runs),
        },
    }
    if compare:
        from tinygen.reference import hf_greedy, to_transformers

        say("transformers: same weights, generate() greedy")
        hf = to_transformers(net)
        ids = torch.tensor([prompt], device=dev)

        def hf_prefill():
            hf(ids, use_cache=True)
            sync()

        hf_prefill_s = _median_time(hf_prefill, repeats)

        def hf_decode():
            clock = _Clock()
            start = time.perf_counter()
            out = hf_greedy(hf, prompt, new_tokens, streamer=clock)
            return _decode_rates(clock.stamps[1:], start, new_tokens), out  # stamp 0 is the prompt

        hf_decode()
        hf_runs = [hf_decode() for _ in range(repeats)]
        ref = {
            "prefill_tok_s": prompt_tokens / hf_prefill_s,
            "first_token_ms": 1000 * statistics.median(r[0][0] for r in hf_runs),
            "decode_tok_s": statistics.median(r[0][1] for r in hf_runs),
        }
        result["transformers"] = ref
        result["ratio"] = {
            "decode": result["tinygen"]["decode_tok_s"] / ref["decode_tok_s"],
            "prefill": result["tinygen"]["prefill_tok_s"] / ref["prefill_tok_s"],
            "first_token": ref["first_token_ms"] / result["tinygen"]["first_token_ms"],
        }
        # Same weights, same greedy rule: the first tokens must agree, or the comparison is void.
        agree = 0
        for a, b in zip(ours_tokens, hf_runs[0][1]):
            if a != b:
                break
            agree += 1
        result["greedy_agreement"] = f"{agree}/{new_tokens} tokens"
    return result


def run_train(model=None, shape=None, steps=8, batch_size=8, threads=None, device="auto", progress=None) -> dict:
    """Training throughput of the real training loop on random tokens: tokens/s and, on GPU, MFU."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from tinygen import engine
    from tinygen.tokenizer import Tokenizer
    from tinygen.train import Step, TrainSettings, train

    if threads:
        torch.set_num_threads(threads)
    if steps < 3:
        raise TinygenError("--steps must be at least 3 (the first two are warm-up)")
    dev = engine.resolve_device(device)
    net, label = _build(model, shape or ("tiny" if model is None else None), torch.device("cpu"), torch.float32)
    cfg = net.config
    net = net.train()
    if progress is not None:
        progress.print(f"[dim]training {label}, {net.num_params() / 1e6:.1f}M params on {dev}, "
                       f"batch {batch_size} x {cfg.block_size} tokens, {steps} steps[/dim]")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=batch_size * (cfg.block_size + 1) * 4, dtype=np.int64)
    settings = TrainSettings(max_steps=steps, batch_size=batch_size, eval_every=10**9, warmup_steps=1, sample_tokens=0)
    # A byte-level stand-in tokenizer: the loop needs one to write its checkpoint.
    stand_in = Tokenizer([bytes([b]) for b in range(256)], r"\S+|\s+", {})
    with tempfile.TemporaryDirectory() as tmp:
        events = list(train(net, stand_in, tokens, tokens[:0], Path(tmp) / "bench.safetensors", settings, device=dev))
    rates = [e for e in events if isinstance(e, Step)][2:]
    tps = statistics.median(e.tokens_per_s for e in rates)
    mfus = [e.mfu for e in rates if e.mfu is not None]
    return {
        "model": label, "device": str(dev), "threads": torch.get_num_threads(), "params": net.num_params(),
        "config": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "arch")},
        "batch": [batch_size, cfg.block_size], "steps": steps,
        "train_tok_s": tps, "mfu": statistics.median(mfus) if mfus else None,
    }


def print_table(result: dict, console) -> None:
    from rich.table import Table

    cfg = result["config"]
    title = (f"{result['model']} · {result['params'] / 1e6:.1f}M params · {cfg['arch']} · {result['device']} "
             f"{result['dtype']} · {result['threads']} threads · prompt {result['prompt_tokens']}, "
             f"{result['new_tokens']} new tokens")
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("tinygen", justify="right")
    has_ref = "transformers" in result
    if has_ref:
        table.add_column("transformers", justify="right")
        table.add_column("ratio", justify="right", style="bold")
    rows = [("decode tok/s (batch 1)", "decode_tok_s", "{:.1f}", "decode"),
            ("prefill tok/s", "prefill_tok_s", "{:.0f}", "prefill"),
            ("time to first token, ms", "first_token_ms", "{:.1f}", "first_token")]
    for label, key, fmt, ratio_key in rows:
        row = [label, fmt.format(result["tinygen"][key])]
        if has_ref:
            row += [fmt.format(result["transformers"][key]), f"{result['ratio'][ratio_key]:.2f}x"]
        table.add_row(*row)
    console.print(table)
    if has_ref:
        console.print(f"[dim]greedy agreement with transformers: {result['greedy_agreement']}[/dim]")
