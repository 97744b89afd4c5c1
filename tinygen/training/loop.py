"""The training loop: next-token cross-entropy, AdamW, warmup + cosine decay, resumable.

`train` is a generator of events (Start, Step, Eval, Saved); it never prints. Only rank 0
yields events and writes files. Everything needed to continue exactly where a run stopped
(optimizer moments, step, tokens seen, the batch sampler's RNG, the dropout RNG) goes into the
state files beside the checkpoint (state.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tinygen.core.checkpoint import save_checkpoint
from tinygen.core.evaluate import score_tokens
from tinygen.core.model import GPT
from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError
from tinygen.training.distributed import Dist
from tinygen.training.state import load_state, save_state


@dataclass
class TrainSettings:
    max_steps: int | None = None
    max_tokens: int | None = None
    max_time: float | None = None  # seconds
    batch_size: int = 16  # sequences per micro-batch on each process
    batch_tokens: int | None = None  # tokens per optimizer step over all processes; default: one micro-batch each
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_tokens: int = 200_000  # validation tokens scored per eval (all of them if fewer)
    sample_tokens: int = 48  # length of the sample shown at each eval; 0 turns samples off
    seed: int = 1337
    compile: bool = False

    def __post_init__(self):
        if not (self.max_steps or self.max_tokens or self.max_time):
            raise TinygenError("say when to stop: --max-steps, --tokens or --time")
        for name in ("batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise TinygenError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.lr > 0:
            raise TinygenError(f"--lr must be positive, got {self.lr}")


# -- events ---------------------------------------------------------------------------------------

@dataclass
class Start:
    params: int
    tokens_per_step: int
    accum_steps: int
    world_size: int
    train_tokens: int
    val_tokens: int
    resumed_step: int
    device: str


@dataclass
class Step:
    step: int
    loss: float
    lr: float
    tokens_seen: int
    tokens_per_s: float
    mfu: float | None
    elapsed: float
    progress: float  # fraction of the budget used, 0..1


@dataclass
class Eval:
    step: int
    val_loss: float | None
    val_bpb: float | None
    sample: list[int] = field(default_factory=list)


@dataclass
class Saved:
    path: Path
    step: int
    reason: str  # "eval", "final", "interrupted"


# -- pieces of the loop ---------------------------------------------------------------------------

def make_optimizer(model: GPT, s: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """Weight decay on matrices (and the embedding) only: decaying gains and biases just hurts."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, fused=device.type == "cuda")


def lr_at(step: int, progress: float, s: TrainSettings) -> float:
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio over the rest of the budget."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * cosine)


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token (PaLM appendix B): 6N plus attention's 12 * L * C * T."""
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * c.n_embd * c.block_size


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


@dataclass
class ChatSupervision:
    """Chat fine-tuning: which targets count, and where conversations start."""

    train_mask: np.ndarray  # parallel to the training tokens: 1 where the loss counts (the assistant's tokens)
    val_mask: np.ndarray
    starts: np.ndarray  # offsets of the training conversations; every window begins at one


def get_batch(data: np.ndarray, rows: torch.Tensor, block: int, device,
              mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (B, T) for windows starting at the given offsets; targets
    where mask is 0 become -1, which the loss ignores."""
    x = torch.from_numpy(np.stack([data[i : i + block] for i in rows.tolist()]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + block] for i in rows.tolist()]).astype(np.int64))
    if mask is not None:
        keep = np.stack([mask[i + 1 : i + 1 + block] for i in rows.tolist()])
        y[torch.from_numpy(keep == 0)] = -1
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -- the loop -------------------------------------------------------------------------------------

def train(
    model: GPT,
    tokenizer: Tokenizer,
    train_data: np.ndarray,
    val_data: np.ndarray,
    out: Path,
    s: TrainSettings,
    *,
    device: torch.device,
    dist: Dist = Dist(),
    resume: bool = False,
    val_bytes: int = 0,
    provenance: dict | None = None,
    chat: ChatSupervision | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[Start | Step | Eval | Saved]:
    cfg = model.config
    block = cfg.block_size
    train_mask, val_mask = (chat.train_mask, chat.val_mask) if chat else (None, None)
    if len(train_data) < block + 2:
        raise TinygenError(f"the training data ({len(train_data)} tokens) is smaller than one sequence of "
                           f"{block + 1}; add text or use a smaller --block-size")
    # ---------------------------------------------------------------- batch geometry
    micro_tokens = s.batch_size * block * dist.world
    accum = max(1, round((s.batch_tokens or micro_tokens) / micro_tokens))
    tokens_per_step = micro_tokens * accum
    total_steps = min(x for x in (s.max_steps, s.max_tokens and math.ceil(s.max_tokens / tokens_per_step)) if x) \
        if (s.max_steps or s.max_tokens) else None

    # ---------------------------------------------------------------- model, optimizer, state
    model.to(device).train()
    optimizer = make_optimizer(model, s, device)
    batch_rng = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed + dist.rank)  # dropout differs per rank, batches are shared
    # The newest metrics record: its losses go into the checkpoint's provenance. The full history
    # lives in the metrics JSONL the display writes, so the state file keeps only this one.
    step, tokens_seen, elapsed_before, last = 0, 0, 0.0, {}
    if resume:
        meta = load_state(out, optimizer, batch_rng)
        step, tokens_seen, elapsed_before = meta["step"], meta["tokens_seen"], meta["elapsed"]
        last = meta.get("last", {})
    runner = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    if s.compile:
        runner = torch.compile(runner)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    peak = peak_flops(device)
    fpt = flops_per_token(model)
    if dist.master:
        yield Start(model.num_params(), tokens_per_step, accum, dist.world, len(train_data), len(val_data), step, str(device))

    def progress_at(step_: int, elapsed_: float) -> float:
        """Fraction of the budget used: of the steps (or tokens) and of the time, whichever is further."""
        fractions = []
        if total_steps:
            fractions.append(step_ / total_steps)
        if s.max_time:
            fractions.append(elapsed_ / s.max_time)
        return max(fractions) if fractions else 0.0

    def checkpoint(reason: str) -> Saved:
        prov = {**(provenance or {}), "steps": step, "tokens_seen": tokens_seen, "train_seconds": round(elapsed, 1)}
        prov.update({k: last[k] for k in ("train_loss", "val_loss", "val_bpb") if last.get(k) is not None})
        save_checkpoint(out, model, tokenizer, prov)
        save_state(out, optimizer, batch_rng, {"step": step, "tokens_seen": tokens_seen, "elapsed": elapsed,
                                               "settings": asdict(s), "last": last})
        return Saved(out, step, reason)

    def evaluate(final: bool) -> Eval:
        val = None
        if len(val_data) > 1:
            with autocast:
                if final:  # all of it, in sliding windows: the numbers `tinygen eval --val-split` reports
                    val = score_tokens(model, val_data, n_bytes=val_bytes, mask=val_mask)
                else:  # a cheaper look mid-run: non-overlapping windows over the first eval_tokens
                    n = min(len(val_data), s.eval_tokens)
                    val = score_tokens(model, val_data, stride=block, max_tokens=n,
                                       n_bytes=int(val_bytes * n / len(val_data)), mask=val_mask)
        sample = []
        if s.sample_tokens and tokenizer.eot_id is not None:
            from tinygen.generate.engine import generate_batch
            from tinygen.generate.sampling import SamplingParams

            gen = torch.Generator(device=device).manual_seed(step)  # its own RNG: samples never shift training
            model.eval()
            with autocast:
                sample = generate_batch(model, [[tokenizer.eot_id]], SamplingParams(temperature=0.8), s.sample_tokens,
                                        stop_ids=[tokenizer.eot_id], generator=gen)[0]
            model.train()
        return Eval(step, val.loss if val else None, val.bits_per_byte if val else None, sample)

    # ---------------------------------------------------------------- train
    start = time.perf_counter()
    elapsed = elapsed_before
    saved_at = step if resume else -1
    while True:
        elapsed = elapsed_before + time.perf_counter() - start
        progress = progress_at(step, elapsed)
        if progress >= 1.0:
            break
        if should_stop():
            if dist.master:
                yield checkpoint("interrupted")
            return
        t0 = time.perf_counter()
        lr = lr_at(step, progress, s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # All processes draw the same offsets; each takes its own slice of every micro-batch,
        # so N processes see exactly the rows one process would see with the same global batch.
        shape = (accum, dist.world, s.batch_size)
        if chat is None:
            offsets = torch.randint(0, len(train_data) - block - 1, shape, generator=batch_rng)
        else:  # whole conversations from their start, so a reply always sees what it answers
            picks = torch.randint(0, len(chat.starts), shape, generator=batch_rng)
            offsets = torch.from_numpy(chat.starts)[picks].clamp(max=len(train_data) - block - 1)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = get_batch(train_data, offsets[micro, dist.rank], block, device, train_mask)
            sync = micro == accum - 1 or dist.world == 1
            with (nullcontext() if sync else runner.no_sync()), autocast:
                loss = runner(x, y) / accum
            loss.backward()
            loss_sum += loss.detach()
        if dist.world > 1:
            import torch.distributed as tdist

            tdist.all_reduce(loss_sum, op=tdist.ReduceOp.AVG)
        last_loss = loss_sum.item()
        if not math.isfinite(last_loss):
            raise TinygenError(f"the loss became {last_loss} at step {step + 1}; stopped without saving, so the last "
                               f"good checkpoint stays. Try a lower --lr")
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        dt = time.perf_counter() - t0
        elapsed = elapsed_before + time.perf_counter() - start
        last = {"step": step, "train_loss": last_loss, "lr": lr, "tokens": tokens_seen, "time": round(elapsed, 2)}
        progress = progress_at(step, elapsed)
        if dist.master:
            tps = tokens_per_step / dt
            yield Step(step, last_loss, lr, tokens_seen, tps, tps * fpt / (peak * dist.world) if peak else None,
                       elapsed, progress)
        done = progress >= 1.0
        if step % s.eval_every == 0 or done:
            if dist.master:
                ev = evaluate(done)
                last.update(val_loss=ev.val_loss, val_bpb=ev.val_bpb)
                yield ev
                yield checkpoint("final" if done else "eval")
            saved_at = step
    if dist.master and saved_at != step:
        yield checkpoint("final")
