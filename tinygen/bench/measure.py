"""Timing for `tinygen bench`: repeats taken in turn with the reference, and the spread of their ratios.

On a shared machine, load comes and goes within seconds. Timing all of ours and then all of the
reference lets a burst of load land on one side only, and the ratio says nothing. So each repeat
times ours and the reference back to back (alternating which goes first), each repeat gives its
own ratio, and the range of those ratios says how far the figure can be trusted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync_for(device: torch.device) -> Callable[[], None]:
    """What makes a timing wait for the device's queued work: a CUDA sync, or nothing on a CPU."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def timer(fn: Callable[[], object], sync: Callable[[], None]) -> Callable[[], float]:
    """fn as a call that returns the seconds it took."""
    def timed() -> float:
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    return timed


def interleave(ours: Callable, ref: Callable | None, repeats: int, warmup: int = 1) -> tuple[list, list]:
    """The results of `repeats` calls of ours() and of ref() (None: ours alone), after `warmup`
    untimed calls of each (allocator, kernels, lazy init). Each pair runs back to back and the
    order alternates, so neither side always meets the machine as the other left it."""
    a, b = interleave_all([ours, ref], repeats, warmup)
    return a, b


def interleave_all(fns: list[Callable | None], repeats: int, warmup: int = 1) -> list[list]:
    """interleave for any number of sides (None: a side not run, with no results): each repeat
    calls them back to back, forwards and then backwards on the next repeat."""
    present = [f for f in fns if f is not None]
    for _ in range(warmup):
        for f in present:
            f()
    results: dict[int, list] = {id(f): [] for f in present}
    for i in range(repeats):
        for f in (present if i % 2 == 0 else present[::-1]):
            results[id(f)].append(f())
    return [results[id(f)] if f is not None else [] for f in fns]


def in_step(iterators: list) -> list[list[tuple[float, object]]]:
    """Run iterators step by step in turn, each next() timed, forwards and then backwards on the next
    step, until all are spent: for each, its (seconds, item) per step. Where a whole run of each side
    lasts seconds, load that comes and goes within them lands on one side; two steps back to back
    meet the same machine, so the sums of their times compare the sides without it."""
    iterators = list(iterators)
    steps: list[list[tuple[float, object]]] = [[] for _ in iterators]
    live = list(range(len(iterators)))
    turn = 0
    while live:
        for i in (live if turn % 2 == 0 else live[::-1]):
            start = time.perf_counter()
            try:
                item = next(iterators[i])
            except StopIteration:
                live = [j for j in live if j != i]
                continue
            steps[i].append((time.perf_counter() - start, item))
        turn += 1
    return steps


def median_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    return statistics.median(interleave(timer(fn, sync), None, repeats)[0])


def paired_ratio(top: list[float], bottom: list[float]) -> tuple[float, list[float]]:
    """The median of the per-repeat ratios top/bottom, and their [smallest, largest]."""
    ratios = [a / b for a, b in zip(top, bottom)]
    return statistics.median(ratios), [min(ratios), max(ratios)]


class Clock:
    """A transformers streamer that notes when generate() hands over each new token."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def decode_rates(stamps: list[float], start: float, n: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s after it) from per-token timestamps."""
    first = stamps[0] - start
    rate = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else float("nan")
    return first, rate
