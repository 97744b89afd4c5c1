"""The training loop: next-token cross-entropy, AdamW or Muon (optim.py), warmup then cosine or
warmup-stable-decay, resumable; the checkpoint kept is the one of the lowest validation loss.

`train` is a generator of events (events.py); it never prints. Only rank 0 yields events and
writes files: the checkpoint, its state and the metrics (metrics.py). Everything needed to
continue exactly where a run stopped (optimizer moments, step, tokens seen, the batch sampler's
RNG, the dropout RNG, and the last weights when the checkpoint holds earlier, better ones) goes
into the state files beside the checkpoint (state.py). Evaluation and saving happen at step
boundaries, where all ranks also decide together whether to stop (stopping.py): on a request, at
the end of the budget, or when validation has stopped improving (patience) or is rising while the
training loss falls (overfitting, with early_stop).

A Trainer is one run. Its phases are its methods, in the order a run meets them: set-up (the
constructor, then `begin`), the step boundary (`run`), `step`, `evaluate` and `save`, and `stop`.
What changes as the run goes is one RunState.
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
from tinygen.core.evaluate import document_start, score_tokens
from tinygen.core.model import GPT
from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError
from tinygen.training.batches import Batches, ChatSupervision
from tinygen.training.distributed import Dist
from tinygen.training.events import Eval, Kept, Saved, Start, Step, TrainingFailed
from tinygen.training.keeping import EvalRecord, eval_interval
from tinygen.training.metrics import MetricsLog
from tinygen.training.optim import make_optimizer
from tinygen.training.plan import flops_per_token
from tinygen.training.precision import training_dtype
from tinygen.training.schedule import lr_at
from tinygen.training.settings import TrainSettings
from tinygen.training.state import (
    load_state,
    read_state_meta,
    remove_state,
    rng_states,
    save_state,
)
from tinygen.training.stopping import PeerFailed, agree


@dataclass
class RunState:
    """What changes as a run goes. The counters and `last` are what a save writes and a resume
    restores; the rest says where the work of the step boundaries stands."""

    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # seconds trained, earlier sessions included, as the ranks agreed at the last boundary
    # The newest metrics record: its losses go into the checkpoint's provenance. The full history
    # is in the metrics JSONL, so the state file keeps only this one.
    last: dict = field(default_factory=dict)
    evaluated_at: int = 0  # the weights a run starts (or resumes) from are not evaluated again
    final_at: int = -1  # the step whose final evaluation and save are done
    saved_at: int = -1  # rank 0: the step the files on disk hold
    failure: tuple[str, Exception] | None = None  # rank 0's failed evaluation or save: everyone stops next
    record: EvalRecord = field(default_factory=EvalRecord)  # rank 0's: what is kept, whether to end early


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
    trainer = Trainer(model, tokenizer, train_data, val_data, out, s, device=device, dist=dist or Dist(),
                      resume=resume, val_bytes=val_bytes, provenance=provenance, recipe=recipe, chat=chat,
                      peak_flops=peak_flops)
    if trainer.dist.master:
        yield trainer.begin()
    yield from trainer.run(should_stop)


class Trainer:
    """One run: what it trains, on what and with what, fixed at set-up, and its RunState."""

    # ---------------------------------------------------------------- set-up
    def __init__(self, model: GPT, tokenizer: Tokenizer, train_data: np.ndarray, val_data: np.ndarray, out: Path,
                 s: TrainSettings, *, device: torch.device, dist: Dist, resume: bool, val_bytes: int,
                 provenance: dict | None, recipe: dict | None, chat: ChatSupervision | None,
                 peak_flops: float | None):
        block = model.config.block_size
        if len(train_data) < block + 2:
            raise TinygenError(f"the training data ({len(train_data)} tokens) is smaller than one sequence of "
                               f"{block + 1}; add text or use a smaller --block-size")
        self.model, self.tokenizer, self.out, self.s = model, tokenizer, out, s
        self.train_tokens, self.val_data, self.val_bytes, self.chat = len(train_data), val_data, val_bytes, chat
        self.device, self.dist, self.resume = device, dist, resume
        self.provenance, self.recipe = provenance or {}, recipe or {}
        # ------------------------------------------------------------ batch geometry
        micro_tokens = s.batch_size * block * dist.world
        self.accum = max(1, round((s.batch_tokens or micro_tokens) / micro_tokens))
        self.tokens_per_step = micro_tokens * self.accum
        self.eval_every = s.eval_every or eval_interval(len(train_data), self.tokens_per_step)
        self.total_steps = min(x for x in (s.max_steps, s.max_tokens and math.ceil(s.max_tokens / self.tokens_per_step))
                               if x) if (s.max_steps or s.max_tokens) else None
        # ------------------------------------------------------------ model, optimizer, state
        model.to(device).train()
        self.optimizer = make_optimizer(model, s, device)
        batch_rng = torch.Generator().manual_seed(s.seed)
        torch.manual_seed(s.seed + dist.rank)  # dropout differs per rank, batches are shared
        self.state = self.resumed(batch_rng) if resume else RunState()
        self.elapsed_before = self.state.elapsed
        self.batches = Batches(train_data, batch_rng, (self.accum, dist.world, s.batch_size), block, dist.rank,
                               device, chat)
        self.runner = self.wrapped(model)
        # Mixed precision: float32 weights, gradients and optimizer moments (and so checkpoint), with the
        # matmuls of the forward and backward in bf16. bf16 keeps float32's exponent range, so unlike
        # fp16 it needs no loss scaling.
        self.compute = training_dtype(device, s.dtype)
        self.autocast = torch.autocast(device.type, dtype=self.compute) if self.compute != torch.float32 \
            else nullcontext()
        # MFU only against a datasheet's bf16 peak, which bf16 training aims at; `tinygen bench --train`
        # measures a peak where there is no datasheet.
        self.peak = peak_flops if self.compute == torch.bfloat16 else None
        self.flops_per_token = flops_per_token(model)
        self.metrics = MetricsLog(out)
        self.started = 0.0  # perf_counter when this session's steps began: set by `run`

    def resumed(self, batch_rng: torch.Generator) -> RunState:
        """The saved run's counters, with the optimizer, the batch sampler and this rank's dropout
        generators put back where it stopped."""
        s, out, dist = self.s, self.out, self.dist
        # Another optimizer's moments do not fit this one (runs from before --optimizer used AdamW).
        trained_with = read_state_meta(out).get("settings", {}).get("optimizer", "adamw")
        if trained_with != s.optimizer:
            raise TinygenError(f"the run at {out} was trained with --optimizer {trained_with}; resume it with "
                               f"the same optimizer, or start a new run with --force")
        meta = load_state(out, self.optimizer, batch_rng, dist.rank, self.device, self.model)
        if meta.get("tokens_per_step", self.tokens_per_step) != self.tokens_per_step:
            raise TinygenError(f"the run at {out} took {meta['tokens_per_step']:,} tokens per step with "
                               f"{meta.get('world', '?')} process(es), but {dist.world} would take "
                               f"{self.tokens_per_step:,}; resume it with {meta.get('world', 'as many')} process(es)")
        step = meta["step"]
        record = EvalRecord.from_state(meta)
        record.halted = None  # resumed to go on: what ended the run before does not end it again at once
        return RunState(step=step, tokens_seen=meta["tokens_seen"], elapsed=meta["elapsed"],
                        last=meta.get("last", {}), evaluated_at=step, saved_at=step, record=record)

    def wrapped(self, model: GPT) -> torch.nn.Module:
        """What runs the forward and backward: the model, under DDP across processes, compiled if asked."""
        runner = model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            runner = DDP(model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)
        if self.s.compile:
            runner = torch.compile(runner)
        return runner

    def begin(self) -> Start:
        """Rank 0's files made ready for the run, and its Start event."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if not self.resume:  # a fresh run: an older run's optimizer state would not belong to these weights
            remove_state(self.out)
        self.metrics.start(self.state.step)
        return Start(self.model.num_params(), self.tokens_per_step, self.accum, self.dist.world, self.train_tokens,
                     len(self.val_data), self.state.step, str(self.device), str(self.compute).removeprefix("torch."))

    # ---------------------------------------------------------------- the step boundary
    def run(self, should_stop: Callable[[], bool]) -> Iterator[Step | Eval | Saved]:
        """Steps until the budget is spent or the ranks agree to stop; evaluation, saving and
        stopping all happen at the boundary between two steps."""
        st = self.state
        self.started = time.perf_counter()
        while True:
            stop, failed, halted, st.elapsed = agree(self.dist, should_stop(), st.failure is not None,
                                                     st.record.halted is not None, self.clock())
            finished = self.progress(st.step, st.elapsed) >= 1.0 or halted
            if failed or stop or (finished and st.final_at == st.step):
                yield from self.stop(stop, failed)
                return
            if finished or (st.step != st.evaluated_at and st.step % self.eval_every == 0):
                yield from self.evaluate(finished)
                continue
            if (event := self.step()) is not None:
                yield event

    def clock(self) -> float:
        """Seconds trained, this session and the ones before it."""
        return self.elapsed_before + time.perf_counter() - self.started

    def progress(self, step: int, elapsed: float) -> float:
        """Fraction of the budget used: of the steps (or tokens) and of the time, whichever is further."""
        fractions = []
        if self.total_steps:
            fractions.append(step / self.total_steps)
        if self.s.max_time:
            fractions.append(elapsed / self.s.max_time)
        return max(fractions) if fractions else 0.0

    # ---------------------------------------------------------------- one optimizer step
    def step(self) -> Step | None:
        """One optimizer step on every rank; on rank 0 its metrics row is written and its event returned."""
        s, st = self.s, self.state
        t0 = time.perf_counter()
        lr = lr_at(st.step, self.progress(st.step, st.elapsed), s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.mean_loss(self.forward_backward())
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        st.tokens_seen += self.tokens_per_step
        st.record.trained(loss)
        dt = time.perf_counter() - t0
        now = self.clock()
        st.last = {"step": st.step, "train_loss": loss, "lr": lr, "tokens": st.tokens_seen, "time": round(now, 2)}
        if not self.dist.master:
            return None
        tps = self.tokens_per_step / dt
        mfu = tps * self.flops_per_token / (self.peak * self.dist.world) if self.peak else None
        self.metrics.write({**st.last, "tokens_per_s": round(tps, 1), "mfu": mfu})
        return Step(st.step, loss, lr, st.tokens_seen, tps, mfu, now, self.progress(st.step, now))

    def forward_backward(self) -> torch.Tensor:
        """The step's gradients, accumulated over its micro-batches; the sum of their losses, each
        already divided by their number."""
        accum = self.accum
        offsets, batch = self.batches.next_step()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = batch
            sync = micro == accum - 1 or self.dist.world == 1
            with (nullcontext() if sync else self.runner.no_sync()), self.autocast:
                loss = self.runner(x, y) / accum
            # The next micro-batch (or the next step's first) is gathered and copied while the
            # device runs this forward and backward, as nanoGPT does: on a GPU the kernels are
            # queued and the copy from pinned memory does not block.
            if micro + 1 < accum:
                batch = self.batches.fetch(offsets, micro + 1)
            else:
                self.batches.fetch_ahead()
            loss.backward()
            loss_sum += loss.detach()
        return loss_sum

    def mean_loss(self, loss_sum: torch.Tensor) -> float:
        """The step's loss averaged over the ranks; a loss that is not finite stops every rank here."""
        dist = self.dist
        if dist.world > 1:
            import torch.distributed as tdist

            tdist.all_reduce(loss_sum, op=tdist.ReduceOp.AVG)
        loss = loss_sum.item()
        if not math.isfinite(loss):  # the same all-reduced loss on every rank: they all stop here
            dist.stopped_together = True
            if not dist.master:
                raise PeerFailed(f"stopped because the loss became {loss}")
            raise TinygenError(f"the loss became {loss} at step {self.state.step + 1}; stopped without saving, so the "
                               f"last good checkpoint stays. Try a lower --lr")
        return loss

    # ---------------------------------------------------------------- evaluate and save
    def evaluate(self, finished: bool) -> Iterator[Eval | Saved]:
        """Rank 0 scores the validation tokens, draws a sample and saves. A failure there is kept in
        the state, for every rank to stop on at the next boundary."""
        st = self.state
        rngs = rng_states(self.dist, self.device)  # every rank, at the boundary the save will hold
        if self.dist.master:
            doing = f"evaluation at step {st.step}"
            try:
                val = self.validation(finished)
                # The run's evaluations compare alike: the final one scores in sliding windows, the
                # others in plain ones, which read less context and so score a little worse.
                compared = self.validation(False) if finished and val else val
                doing = f"sampling at step {st.step}"
                ev = Eval(st.step, val.loss if val else None, val.bits_per_byte if val else None, self.sample())
                st.last.update(val_loss=ev.val_loss, val_bpb=ev.val_bpb)
                if ev.val_loss is not None:
                    self.metrics.write({"step": st.step, "val_loss": ev.val_loss, "val_bpb": ev.val_bpb})
                yield ev
                improved, overfit = st.record.judge(st.step, compared.loss if compared else None, self.s,
                                                    self.train_tokens)
                if overfit is not None:
                    yield overfit
                doing = f"saving at step {st.step}"
                yield self.save("final" if finished else "eval", rngs, improved)
            except Exception as e:
                st.failure = (doing, e)
        st.evaluated_at = st.step
        if finished:
            st.final_at = st.step

    def validation(self, final: bool):
        """The validation loss and bits per byte (core.evaluate.Score), or None without validation tokens."""
        val_data, val_mask = self.val_data, self.chat.val_mask if self.chat else None
        if len(val_data) < 2:
            return None
        if final:  # all of it, in sliding windows and float32: the numbers `tinygen eval --val-split` reports
            return score_tokens(self.model, val_data, n_bytes=self.val_bytes, mask=val_mask)
        n = min(len(val_data), self.s.eval_tokens)  # a cheaper look mid-run: non-overlapping windows over the first n
        with self.autocast:
            return score_tokens(self.model, val_data, stride=self.model.config.block_size, max_tokens=n,
                                n_bytes=int(self.val_bytes * n / len(val_data)), mask=val_mask)

    def sample(self) -> list[int]:
        """A few tokens the model writes from scratch, to show how it is coming along; [] when off."""
        tokenizer = self.tokenizer
        start = document_start(tokenizer)  # a sample is a new document, as the model learns them
        if not self.s.sample_tokens or start is None:
            return []
        from tinygen.generate.engine import generate_batch
        from tinygen.generate.sampling import SamplingParams

        # Its own RNG: samples never shift training.
        gen = torch.Generator(device=self.device).manual_seed(self.state.step)
        self.model.eval()
        try:
            # In the weights' own dtype, outside autocast: a sample is a few dozen batch-1 steps,
            # where bf16 saves nothing, and it reads as the saved checkpoint will generate.
            stops = {start, tokenizer.eos_id} - {None}
            return generate_batch(self.model, [[start]], SamplingParams(temperature=0.8), self.s.sample_tokens,
                                  stop_ids=stops, generator=gen)[0]
        finally:
            self.model.train()

    def save(self, reason: str, rngs: dict, improved: bool = False) -> Saved:
        """The state to resume from, as it stands at this step boundary, with the last weights; and
        the checkpoint, when these weights are the ones to keep (the last ones, or the lowest
        validation loss yet: improved) or none is kept yet."""
        s, st = self.s, self.state
        record = st.record
        if improved or s.keep == "last" or record.kept_step is None or not self.out.exists():
            prov = {**self.provenance, "optimizer": s.optimizer, "steps": st.step, "tokens_seen": st.tokens_seen,
                    "train_seconds": round(st.elapsed, 1),
                    "kept": "the last step" if s.keep == "last" else "the lowest validation loss"}
            prov.update({k: st.last[k] for k in ("train_loss", "val_loss", "val_bpb") if st.last.get(k) is not None})
            save_checkpoint(self.out, self.model, self.tokenizer, prov)
            record.kept_step = st.step
        save_state(self.out, self.optimizer, self.batches.at_boundary(), rngs,
                   {"step": st.step, "tokens_seen": st.tokens_seen, "elapsed": st.elapsed,
                    "tokens_per_step": self.tokens_per_step, "world": self.dist.world, "settings": asdict(s),
                    "recipe": self.recipe, "last": st.last, **record.to_state()},
                   model=None if record.kept_step == st.step else self.model)
        st.saved_at = st.step
        return Saved(self.out, st.step, reason)

    # ---------------------------------------------------------------- stop
    def stop(self, stop: bool, failed: bool) -> Iterator[Saved]:
        """Every rank leaves here together: after rank 0's failure (what was trained is saved, then
        the failure raised), on a stop request (saved, unless this step is already), or once the
        budget is spent and its final evaluation done."""
        st, dist = self.state, self.dist
        dist.stopped_together = True
        # Gathered from every rank, before rank 0 may save: a collective all ranks reach together.
        rngs = rng_states(dist, self.device) if failed or (stop and st.final_at != st.step) else {}
        if failed and not dist.master:
            raise PeerFailed("stopped because rank 0 failed; its error is above")
        if failed:
            if st.saved_at != st.step:
                with suppress(Exception):  # the save itself may be what failed
                    yield self.save("error", rngs)
            raise TrainingFailed(*st.failure, self.out, st.saved_at) from st.failure[1]
        if stop and st.final_at != st.step and dist.master:
            yield self.save("interrupted", rngs) if st.saved_at != st.step else Saved(self.out, st.step, "interrupted")
        record = st.record
        if dist.master and record.kept_step is not None:
            yield Kept(record.kept_step, record.kept_val(st.step, st.last.get("val_loss")), self.s.keep, st.step,
                       st.last.get("val_loss"), len(record.evals), record.halted)
