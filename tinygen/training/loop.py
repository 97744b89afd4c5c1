"""The training loop: next-token cross-entropy, AdamW or Muon (optim.py), warmup then cosine or
warmup-stable-decay, resumable.

`train` is a generator of events (Start, Step, Eval, Saved); it never prints. Only rank 0
yields events and writes files: the checkpoint, its state and the metrics (metrics.py).
Everything needed to continue exactly where a run stopped (optimizer moments, step, tokens seen,
the batch sampler's RNG, the dropout RNG) goes into the state files beside the checkpoint
(state.py). Evaluation and saving happen at step boundaries, where all ranks also decide
together whether to stop (stopping.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext, suppress
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
from tinygen.training.metrics import MetricsLog
from tinygen.training.optim import (
    DEFAULT_LR,
    OPTIMIZERS,
    default_optimizer,
    make_optimizer,
)
from tinygen.training.precision import training_dtype
from tinygen.training.state import (
    load_state,
    read_state_meta,
    remove_state,
    rng_states,
    save_state,
)
from tinygen.training.stopping import PeerFailed, agree

SCHEDULES = ("cosine", "wsd")


@dataclass
class TrainSettings:
    max_steps: int | None = None
    max_tokens: int | None = None
    max_time: float | None = None  # seconds
    batch_size: int = 32  # sequences per micro-batch on each process
    batch_tokens: int | None = None  # tokens per optimizer step over all processes; default: one micro-batch each
    lr: float | None = None  # None: the optimizer's own default (optim.DEFAULT_LR)
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 20
    schedule: str = "wsd"  # warmup, stable at lr, then a linear cooldown to 0; or "cosine" (lr_at)
    cooldown: float = 0.2  # wsd: the share of the budget spent cooling down
    weight_decay: float = 0.1  # decoupled, on matrices and the embedding; Muon's matrices too
    # "muon": Muon for the blocks' matrices, AdamW for the rest (optim.py); or "adamw". None: muon
    # where torch has it.
    optimizer: str | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_tokens: int = 200_000  # validation tokens scored per eval (all of them if fewer)
    sample_tokens: int = 48  # length of the sample shown at each eval; 0 turns samples off
    seed: int = 1337
    compile: bool = False
    dtype: str = "auto"  # what the forward and backward compute in (core/device.training_dtype)

    def __post_init__(self):
        if not (self.max_steps or self.max_tokens or self.max_time):
            raise TinygenError("say when to stop: --max-steps, --tokens or --time")
        for name in ("batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise TinygenError(f"--{name.replace('_', '-')} must be at least 1")
        if self.optimizer is None:
            self.optimizer = default_optimizer()
        if self.optimizer not in OPTIMIZERS:
            raise TinygenError(f"unknown --optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        if not self.lr > 0:
            raise TinygenError(f"--lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise TinygenError(f"unknown --schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if not 0 < self.cooldown <= 1:
            raise TinygenError(f"--cooldown is a share of the budget, above 0 and at most 1; got {self.cooldown}")


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
    dtype: str  # "float32", or "bfloat16" (autocast over float32 weights)


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
    reason: str  # "eval", "final", "interrupted", "error" (on the way out after a failure)


# -- pieces of the loop ---------------------------------------------------------------------------

def lr_at(step: int, progress: float, s: TrainSettings) -> float:
    """Linear warmup, then either cosine from lr down to lr * min_lr_ratio over the rest of the
    budget, or (wsd) lr held until the last `cooldown` of the budget and from there straight down to 0.

    Warmup-stable-decay (Hu et al., MiniCPM; Hägele et al., 2024) matches cosine at the end and
    spends longer at the full lr; progress is a share of steps or of time, so under --time the
    cooldown starts when 1 - cooldown of the time is gone."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.schedule == "wsd":
        return s.lr * min(1.0, max(0.0, (1 - progress) / s.cooldown))
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * cosine)


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token (PaLM appendix B): 6N plus attention's 12 * L * C * T."""
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * c.n_embd * c.block_size


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

class TrainingFailed(TinygenError):
    """Rank 0's evaluation, sampling or save failed mid-run, and every rank stopped with it. The
    trained steps were saved on the way out when that could still be done (saved_step; -1: never)."""

    def __init__(self, doing: str, cause: Exception, out: Path, saved_step: int):
        why = str(cause) if isinstance(cause, TinygenError) else f"{type(cause).__name__}: {cause}"
        kept = (f"the model and its training state at step {saved_step} are saved in {out}" if saved_step >= 0
                else "nothing could be saved")
        super().__init__(f"{doing} failed ({why}); {kept}")
        self.saved_step = saved_step


def train(
    model: GPT,
    tokenizer: Tokenizer,
    train_data: np.ndarray,
    val_data: np.ndarray,
    out: Path,
    s: TrainSettings,
    *,
    device: torch.device,
    dist: Dist | None = None,
    resume: bool = False,
    val_bytes: int = 0,
    provenance: dict | None = None,
    recipe: dict | None = None,
    chat: ChatSupervision | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    peak_flops: float | None = None,
) -> Iterator[Start | Step | Eval | Saved]:
    """Train, yielding events on rank 0. `recipe` (what the run was made from) is kept in the state
    file for --resume to check; `should_stop` is read at each step boundary. `peak_flops`, a GPU's
    datasheet bf16 FLOP/s (bench/hardware.py), is what a bf16 run's MFU is put against."""
    dist = dist or Dist()
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
    # is in the metrics JSONL, so the state file keeps only this one.
    step, tokens_seen, elapsed_before, last = 0, 0, 0.0, {}
    if resume:
        # Another optimizer's moments do not fit this one (runs from before --optimizer used AdamW).
        trained_with = read_state_meta(out).get("settings", {}).get("optimizer", "adamw")
        if trained_with != s.optimizer:
            raise TinygenError(f"the run at {out} was trained with --optimizer {trained_with}; resume it with "
                               f"the same optimizer, or start a new run with --force")
        meta = load_state(out, optimizer, batch_rng, dist.rank, device)
        step, tokens_seen, elapsed_before = meta["step"], meta["tokens_seen"], meta["elapsed"]
        last = meta.get("last", {})
        if meta.get("tokens_per_step", tokens_per_step) != tokens_per_step:
            raise TinygenError(f"the run at {out} took {meta['tokens_per_step']:,} tokens per step with "
                               f"{meta.get('world', '?')} process(es), but {dist.world} would take "
                               f"{tokens_per_step:,}; resume it with {meta.get('world', 'as many')} process(es)")
    runner = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    if s.compile:
        runner = torch.compile(runner)
    # Mixed precision: float32 weights, gradients and optimizer moments (and so checkpoint), with the
    # matmuls of the forward and backward in bf16. bf16 keeps float32's exponent range, so unlike
    # fp16 it needs no loss scaling.
    compute = training_dtype(device, s.dtype)
    autocast = torch.autocast(device.type, dtype=compute) if compute != torch.float32 else nullcontext()
    # MFU only against a datasheet's bf16 peak, which bf16 training aims at; `tinygen bench --train`
    # measures a peak where there is no datasheet.
    peak = peak_flops if compute == torch.bfloat16 else None
    fpt = flops_per_token(model)
    metrics = MetricsLog(out)
    if dist.master:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not resume:  # a fresh run: an older run's optimizer state would not belong to these weights
            remove_state(out)
        metrics.start(step)
        yield Start(model.num_params(), tokens_per_step, accum, dist.world, len(train_data), len(val_data), step,
                    str(device), str(compute).removeprefix("torch."))

    def progress_at(step_: int, elapsed_: float) -> float:
        """Fraction of the budget used: of the steps (or tokens) and of the time, whichever is further."""
        fractions = []
        if total_steps:
            fractions.append(step_ / total_steps)
        if s.max_time:
            fractions.append(elapsed_ / s.max_time)
        return max(fractions) if fractions else 0.0

    def save(reason: str, rngs: dict) -> Saved:
        nonlocal saved_at
        prov = {**(provenance or {}), "optimizer": s.optimizer, "steps": step, "tokens_seen": tokens_seen,
                "train_seconds": round(elapsed, 1)}
        prov.update({k: last[k] for k in ("train_loss", "val_loss", "val_bpb") if last.get(k) is not None})
        save_checkpoint(out, model, tokenizer, prov)
        at_boundary = torch.Generator()
        at_boundary.set_state(boundary_rng)
        save_state(out, optimizer, at_boundary, rngs, {"step": step, "tokens_seen": tokens_seen, "elapsed": elapsed,
                                               "tokens_per_step": tokens_per_step, "world": dist.world,
                                               "settings": asdict(s),
                                               "recipe": recipe or {}, "last": last})
        saved_at = step
        return Saved(out, step, reason)

    def validation(final: bool):
        if len(val_data) < 2:
            return None
        if final:  # all of it, in sliding windows and float32: the numbers `tinygen eval --val-split` reports
            return score_tokens(model, val_data, n_bytes=val_bytes, mask=val_mask)
        n = min(len(val_data), s.eval_tokens)  # a cheaper look mid-run: non-overlapping windows over the first n
        with autocast:
            return score_tokens(model, val_data, stride=block, max_tokens=n, n_bytes=int(val_bytes * n / len(val_data)),
                                mask=val_mask)

    def sample() -> list[int]:
        if not s.sample_tokens or tokenizer.eot_id is None:
            return []
        from tinygen.generate.engine import generate_batch
        from tinygen.generate.sampling import SamplingParams

        gen = torch.Generator(device=device).manual_seed(step)  # its own RNG: samples never shift training
        model.eval()
        try:
            # In the weights' own dtype, outside autocast: a sample is a few dozen batch-1 steps,
            # where bf16 saves nothing, and it reads as the saved checkpoint will generate.
            return generate_batch(model, [[tokenizer.eot_id]], SamplingParams(temperature=0.8), s.sample_tokens,
                                  stop_ids=[tokenizer.eot_id], generator=gen)[0]
        finally:
            model.train()

    # ---------------------------------------------------------------- batches
    shape = (accum, dist.world, s.batch_size)

    def draw() -> torch.Tensor:
        """One step's window offsets (accum, world, batch). All processes draw the same; each takes
        its own slice of every micro-batch, so N processes see exactly the rows one process would
        see with the same global batch."""
        if chat is None:
            return torch.randint(0, len(train_data) - block - 1, shape, generator=batch_rng)
        # Whole conversations from their start, so a reply always sees what it answers.
        picks = torch.randint(0, len(chat.starts), shape, generator=batch_rng)
        return torch.from_numpy(chat.starts)[picks].clamp(max=len(train_data) - block - 1)

    def fetch(offsets: torch.Tensor, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return get_batch(train_data, offsets[micro, dist.rank], block, device, train_mask)

    # The next step's offsets and first micro-batch, drawn during the step before. batch_rng has
    # then moved past them, so saves write boundary_rng, its state where the next step draws: a
    # resumed run draws the same batches whether or not one was fetched ahead.
    ahead: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
    boundary_rng = batch_rng.get_state()

    # ---------------------------------------------------------------- train
    start = time.perf_counter()
    elapsed = elapsed_before
    evaluated_at = step  # the weights a run starts (or resumes) from are not evaluated again
    final_at = -1  # the step whose final evaluation and save are done
    saved_at = step if resume else -1  # rank 0: the step the files on disk hold
    failure: tuple[str, Exception] | None = None  # rank 0's failed evaluation or save: everyone stops next
    while True:
        # ------------------------------------------------------------ step boundary: decided by all ranks
        stop, failed, elapsed = agree(dist, should_stop(), failure is not None,
                                      elapsed_before + time.perf_counter() - start)
        finished = progress_at(step, elapsed) >= 1.0
        if failed or stop or (finished and final_at == step):
            dist.stopped_together = True
            # Gathered from every rank, before rank 0 may save: a collective all ranks reach together.
            rngs = rng_states(dist, device) if failed or (stop and final_at != step) else {}
            if failed and not dist.master:
                raise PeerFailed("stopped because rank 0 failed; its error is above")
            if failed:
                if saved_at != step:
                    with suppress(Exception):  # the save itself may be what failed
                        yield save("error", rngs)
                raise TrainingFailed(*failure, out, saved_at) from failure[1]
            if stop and final_at != step and dist.master:
                yield save("interrupted", rngs) if saved_at != step else Saved(out, step, "interrupted")
            return
        if finished or (step != evaluated_at and step % s.eval_every == 0):
            rngs = rng_states(dist, device)  # every rank, at the boundary the save will hold
            if dist.master:
                doing = f"evaluation at step {step}"
                try:
                    val = validation(finished)
                    doing = f"sampling at step {step}"
                    ev = Eval(step, val.loss if val else None, val.bits_per_byte if val else None, sample())
                    last.update(val_loss=ev.val_loss, val_bpb=ev.val_bpb)
                    if ev.val_loss is not None:
                        metrics.write({"step": step, "val_loss": ev.val_loss, "val_bpb": ev.val_bpb})
                    yield ev
                    doing = f"saving at step {step}"
                    yield save("final" if finished else "eval", rngs)
                except Exception as e:
                    failure = (doing, e)
            evaluated_at = step
            final_at = step if finished else final_at
            continue
        # ------------------------------------------------------------ one optimizer step
        t0 = time.perf_counter()
        lr = lr_at(step, progress_at(step, elapsed), s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if ahead is None:
            offsets = draw()
            batch = fetch(offsets, 0)
        else:
            offsets, batch = ahead
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = batch
            sync = micro == accum - 1 or dist.world == 1
            with (nullcontext() if sync else runner.no_sync()), autocast:
                loss = runner(x, y) / accum
            # The next micro-batch (or the next step's first) is gathered and copied while the
            # device runs this forward and backward, as nanoGPT does: on a GPU the kernels are
            # queued and the copy from pinned memory does not block.
            if micro + 1 < accum:
                batch = fetch(offsets, micro + 1)
            else:
                boundary_rng = batch_rng.get_state()  # what a save after this step must hold
                next_offsets = draw()
                ahead = next_offsets, fetch(next_offsets, 0)
            loss.backward()
            loss_sum += loss.detach()
        if dist.world > 1:
            import torch.distributed as tdist

            tdist.all_reduce(loss_sum, op=tdist.ReduceOp.AVG)
        last_loss = loss_sum.item()
        if not math.isfinite(last_loss):  # the same all-reduced loss on every rank: they all stop here
            dist.stopped_together = True
            if not dist.master:
                raise PeerFailed(f"stopped because the loss became {last_loss}")
            raise TinygenError(f"the loss became {last_loss} at step {step + 1}; stopped without saving, so the last "
                               f"good checkpoint stays. Try a lower --lr")
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        dt = time.perf_counter() - t0
        now = elapsed_before + time.perf_counter() - start
        last = {"step": step, "train_loss": last_loss, "lr": lr, "tokens": tokens_seen, "time": round(now, 2)}
        if dist.master:
            tps = tokens_per_step / dt
            mfu = tps * fpt / (peak * dist.world) if peak else None
            metrics.write({**last, "tokens_per_s": round(tps, 1), "mfu": mfu})
            yield Step(step, last_loss, lr, tokens_seen, tps, mfu, now, progress_at(step, now))
