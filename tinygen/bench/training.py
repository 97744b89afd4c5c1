"""Training speed for `tinygen bench`: tinygen's real training loop against a bare PyTorch loop
(nanoGPT's inner loop) around the transformers model with the same weights, step for step in turn."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import torch

from tinygen.bench.measure import interleave, paired_ratio, sync_for

WARMUP_STEPS = 2  # allocator, kernels, lazy init; with --compile, compilation too


def train_section(net, steps: int, repeats: int, batch_size: int, compare: bool, dev, peak: float, say,
                  compile: bool = False, compute: torch.dtype = torch.float32) -> dict:
    """Tokens/s and MFU of training net on random tokens; with compare, of the reference too, a
    step of each in turn. Timed steps: those after the warm-up, and at least `repeats` of them.
    compute: float32, or bfloat16 for both loops under autocast."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from tinygen.core.tokenizer import Tokenizer
    from tinygen.training.events import Step
    from tinygen.training.loop import train
    from tinygen.training.plan import flops_per_token
    from tinygen.training.settings import TrainSettings

    cfg = net.config
    fpt = flops_per_token(net)
    timed = max(steps - WARMUP_STEPS, repeats)
    turns = ", a step of each loop in turn" if compare else ""
    say(f"training: batch {batch_size} x {cfg.block_size} tokens, {WARMUP_STEPS} + {timed} steps{turns}")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=batch_size * (cfg.block_size + 1) * 4,
                                               dtype=np.int64)
    ref = None
    if compare:
        from tinygen.bench.reference import to_transformers

        hf = to_transformers(net).to(dev).train()  # before training moves and changes the weights
        ref = _bare_loop(torch.compile(hf) if compile else hf, tokens, batch_size, cfg.block_size, dev, compute)
    # AdamW at the bare loop's lr, whatever train's default optimizer: the same work on both sides.
    settings = TrainSettings(max_steps=WARMUP_STEPS + timed, batch_size=batch_size, eval_every=10**9, warmup_steps=1,
                             sample_tokens=0, compile=compile, dtype=str(compute).removeprefix("torch."),
                             optimizer="adamw", lr=1e-4)
    # A byte-level stand-in tokenizer: the loop needs one to write its checkpoint.
    stand_in = Tokenizer([bytes([b]) for b in range(256)], r"\S+|\s+", {})
    with tempfile.TemporaryDirectory() as tmp:
        run = train(net.train(), stand_in, tokens, tokens[:0], Path(tmp) / "bench.safetensors", settings, device=dev)
        ours = (e.tokens_per_s for e in run if isinstance(e, Step))
        tps, ref_tps = interleave(lambda: next(ours), ref and (lambda: next(ref)), timed, warmup=WARMUP_STEPS)
        run.close()  # after its last step: the checkpoint it would save is not part of the figure
    section = {"batch": [batch_size, cfg.block_size], "steps": WARMUP_STEPS + timed, "flops_per_token": fpt,
               "tinygen": {"tok_s": statistics.median(tps), "mfu": statistics.median(tps) * fpt / peak}}
    if ref is not None:
        ref_median = statistics.median(ref_tps)
        section["reference"] = {"tok_s": ref_median, "mfu": ref_median * fpt / peak}
        section["ratio"], section["spread"] = paired_ratio(tps, ref_tps)
    return section


def _bare_loop(hf, tokens, batch_size: int, block: int, dev, compute: torch.dtype) -> Iterator[float]:
    """Tokens/s of each step of nanoGPT's inner loop: batch, forward, loss, backward, clip, AdamW step."""
    import contextlib

    import torch.nn.functional as F

    data = torch.from_numpy(tokens)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=dev.type == "cuda")
    autocast = torch.autocast(dev.type, dtype=compute) if compute != torch.float32 else contextlib.nullcontext()
    sync = sync_for(dev)
    gen = torch.Generator().manual_seed(0)
    while True:
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
        yield batch_size * block / (time.perf_counter() - start)
