"""How a run stops early: a signal becomes a request, and under torchrun the ranks decide together.

A request (Ctrl-C, SIGTERM, a failure on rank 0) is only read at a step boundary. There, one
all-reduce of [stop, failed, halted, elapsed seconds] tells every rank what any rank saw, so they all stop
at the same step, and they all use the slowest clock for the lr schedule and --time. Without it, a
rank that stopped alone left the others waiting in a collective forever.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator

import torch

from tinygen.errors import TinygenError
from tinygen.training.distributed import Dist, all_reduce_max


class PeerFailed(TinygenError):
    """Raised on the other ranks when the ranks stopped together because of rank 0's error, which
    rank 0 reports: the command line keeps them quiet, so the user reads it once."""


class StopFlag:
    """Ctrl-C or SIGTERM asks the loop to save and stop at the next step boundary; a second one
    aborts at once (KeyboardInterrupt).

    On a terminal Ctrl-C reaches every process of the foreground group, and torchrun also forwards
    it to its workers, so a worker can see one request twice within a moment. A repeat within
    `same_within` seconds is that same request; only a later one means "abort now".
    """

    def __init__(self, on_request: Callable[[], None] | None = None, same_within: float = 2.0):
        self.on_request = on_request
        self.same_within = same_within
        self.requested_at: float | None = None
        self._told = False

    def __call__(self) -> bool:
        """Whether a stop was asked for; read at step boundaries, where on_request hears of it.
        The signal handler itself must not print: it runs between any two bytecodes of the main
        thread, which may be inside a write to stderr, and a second write there raises."""
        if self.requested_at is not None and not self._told:
            self._told = True
            if self.on_request is not None:
                self.on_request()
        return self.requested_at is not None

    def request(self) -> None:
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at = now
        elif now - self.requested_at > self.same_within:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """SIGINT and SIGTERM call request() while the block runs; the old handlers come back after."""
        old = {sig: signal.signal(sig, lambda signum, frame: self.request()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


def agree(dist: Dist, stop: bool, failed: bool, halted: bool, elapsed: float) -> tuple[bool, bool, bool, float]:
    """(stop, failed, halted, elapsed) as all ranks decide them: any rank's stop, failure or halt (rank
    0's evaluations ending the run early), the largest elapsed. One small all-reduce per step, nothing
    next to the gradients' own. It runs on the control group: after an evaluation the other ranks
    wait here while rank 0 evaluates, samples and saves."""
    if dist.world == 1:
        return stop, failed, halted, elapsed
    flags = all_reduce_max(dist, torch.tensor([float(stop), float(failed), float(halted), elapsed],
                                              dtype=torch.float64))
    stop_, failed_, halted_, elapsed_ = flags.tolist()
    return stop_ > 0, failed_ > 0, halted_ > 0, elapsed_
