"""What a JSON-schema constraint costs in decode, for `tinygen bench --only structured`.

The same rows (one prompt, seeded sampling, a seed per row) decode with the schema and without,
as two generations advanced a step at a time in turn (measure.in_step): on a shared machine a
whole run of either side lasts seconds, long enough for load to land on one side only, and two
steps back to back meet the same machine. Each repeat is one such pair of generations, and gives
its own ratio (measure.paired_ratio).

A side's rate counts the tokens of its steps after the first, over their time: prefill is out of
it, and so is the first mask (where llguidance makes each row's matcher). The plain side ignores
end-of-text, so its rows decode every token they may; the schema's rows stop only when their JSON
is complete, and the default schema (an array of at least ten objects) is longer than a bench's
usual --new-tokens, so both sides decode as many rows at every step, and what differs is what
the constraint adds to a step.

Beside the step time: the time spent in constrain.masked (llguidance's mask, and applying it to
the logits) and in Matcher.advance (llguidance taking the token drawn), taken by wrapping those two
functions while the bench runs. The engine itself times nothing.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

from tinygen.bench.measure import in_step, interleave, paired_ratio

# Every kind a JSON schema commonly holds: a nested object, an array of objects, an enum, integers
# with bounds, strings with a maxLength. minItems makes its shortest text about 370 tokens
# (SmolLM2's vocabulary), so a row does not finish early.
SCHEMA = {
    "type": "object",
    "properties": {
        "team": {"type": "string", "maxLength": 24},
        "founded": {"type": "integer", "minimum": 1850, "maximum": 2025},
        "players": {
            "type": "array", "minItems": 10,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "position": {"enum": ["goalkeeper", "defender", "midfielder", "forward"]},
                    "age": {"type": "integer", "minimum": 16, "maximum": 45},
                    "stats": {
                        "type": "object",
                        "properties": {"goals": {"type": "integer", "minimum": 0, "maximum": 99},
                                       "assists": {"type": "integer", "minimum": 0, "maximum": 99}},
                        "required": ["goals", "assists"], "additionalProperties": False,
                    },
                },
                "required": ["name", "position", "age", "stats"], "additionalProperties": False,
            },
        },
    },
    "required": ["team", "founded", "players"], "additionalProperties": False,
}
PROMPT = "A football club and its squad as one JSON object, every player with their position, age and stats:\n"
TEMPERATURE = 0.8  # sample's default: greedy text can settle into a loop, which a mask makes cheap
SEED = 0  # row i draws from seed SEED + i, the same on both sides


def structured_section(net, tokenizer, prompt_tokens: int, new_tokens: int, batch_sizes, repeats: int, say,
                       schema: dict | None = None, prompt: str = PROMPT) -> dict:
    """Decode rate and step time with the schema and without, at each batch size, and the mask's
    time a step and a token. The prompt's ids are cut to their last prompt_tokens."""
    from tinygen.generate.constrain import Constraint, Guide
    from tinygen.generate.textgen import prompt_ids

    schema = SCHEMA if schema is None else schema
    constraint = Constraint.json_schema(schema)
    guide = Guide(tokenizer)
    guide.check(constraint)  # llguidance's vocabulary and the schema's grammar, made before any timing
    ids = prompt_ids(tokenizer, prompt)[-prompt_tokens:]
    rows = []
    for b in batch_sizes:
        say(f"JSON schema, batch {b}: {b} rows x {new_tokens} new tokens, with the schema and without, step by step")
        pair = _pair(net, ids, b, new_tokens, tokenizer.stop_ids, lambda: guide.matcher(constraint))
        runs = interleave(pair, None, repeats)[0]
        rows.append(_row(b, runs, tokenizer))
    return {"prompt_tokens": len(ids), "new_tokens": new_tokens, "temperature": TEMPERATURE, "schema": schema,
            "rows": rows}


def _pair(net, ids: list[int], batch: int, new_tokens: int, stop_ids, make_matcher):
    """One repeat: batch rows of the prompt, each with its own seed, decoded under the constraint
    (make_matcher makes a row's matcher) and without it, a step of each in turn."""
    from tinygen.generate import engine
    from tinygen.generate.sampling import SamplingParams

    params = SamplingParams(temperature=TEMPERATURE)
    seeds = [SEED + i for i in range(batch)]

    def run() -> dict:
        made = []  # the rows' matchers, to ask afterwards whether their JSON is complete

        def make():
            made.append(make_matcher())
            return made[-1]

        with _timed_constraint() as spent:
            constrained, plain = in_step([
                engine.generate(net, [ids] * batch, params, new_tokens, stop_ids=stop_ids, seeds=seeds,
                                constraints=[make] * batch),
                engine.generate(net, [ids] * batch, params, new_tokens, seeds=seeds),
            ])
        return {"constrained": {**_figures(constrained, batch), "complete": sum(m.complete for m in made), **spent},
                "plain": _figures(plain, batch)}

    return run


def _figures(steps: list[tuple[float, list]], batch: int) -> dict:
    """One side of a repeat, from its (seconds, [(row, token), ...]) steps: the first step (prefill,
    the first mask) apart from the decode steps after it, and every row's tokens."""
    tokens: list[list[int]] = [[] for _ in range(batch)]
    for _, step in steps:
        for row, token in step:
            tokens[row].append(token)
    decode = steps[1:]
    return {"first_token_s": steps[0][0], "decode_s": sum(s for s, _ in decode), "steps": len(decode),
            "decoded": sum(len(step) for _, step in decode), "tokens": tokens}


@contextmanager
def _timed_constraint():
    """Time constrain.masked (calls, and rows masked) and Matcher.advance while inside. The engine
    calls both through the module, so wrapping them there times every call it makes; a plain
    generation calls neither."""
    from tinygen.generate import constrain

    spent = {"mask_s": 0.0, "mask_calls": 0, "mask_rows": 0, "advance_s": 0.0, "advances": 0}
    masked, advance = constrain.masked, constrain.Matcher.advance

    def timed_masked(logits, matchers, stop_ids):
        start = time.perf_counter()
        try:
            return masked(logits, matchers, stop_ids)
        finally:
            spent["mask_s"] += time.perf_counter() - start
            spent["mask_calls"] += 1
            spent["mask_rows"] += sum(m is not None for m in matchers)

    def timed_advance(self, token):
        start = time.perf_counter()
        try:
            return advance(self, token)
        finally:
            spent["advance_s"] += time.perf_counter() - start
            spent["advances"] += 1

    constrain.masked, constrain.Matcher.advance = timed_masked, timed_advance
    try:
        yield spent
    finally:
        constrain.masked, constrain.Matcher.advance = masked, advance


def _row(batch: int, runs: list[dict], tokenizer) -> dict:
    """One batch size's figures: medians over the repeats, the speed ratio (with the schema over
    without) with its range, and the overhead: the median of the per-repeat step-time ratios, less 1."""
    ours, plain = [r["constrained"] for r in runs], [r["plain"] for r in runs]

    def rate(side: dict) -> float:
        return side["decoded"] / side["decode_s"]

    def step_ms(side: dict) -> float:
        return 1000 * side["decode_s"] / side["steps"]

    def median(values) -> float:
        return statistics.median(list(values))

    ratio, spread = paired_ratio([rate(s) for s in ours], [rate(s) for s in plain])
    slower, _ = paired_ratio([step_ms(s) for s in ours], [step_ms(s) for s in plain])
    last = runs[-1]
    return {
        "batch": batch,
        "constrained_tok_s": median(rate(s) for s in ours), "plain_tok_s": median(rate(s) for s in plain),
        "ratio": ratio, "spread": spread, "overhead": slower - 1,
        "constrained_step_ms": median(step_ms(s) for s in ours), "plain_step_ms": median(step_ms(s) for s in plain),
        "mask_ms_per_step": median(1000 * s["mask_s"] / s["mask_calls"] for s in ours),
        "mask_ms_per_token": median(1000 * s["mask_s"] / s["mask_rows"] for s in ours),
        "advance_ms_per_token": median(1000 * s["advance_s"] / max(1, s["advances"]) for s in ours),
        "constrained_first_token_ms": 1000 * median(s["first_token_s"] for s in ours),
        "plain_first_token_ms": 1000 * median(s["first_token_s"] for s in plain),
        # Rows that end before the other side's would leave fewer rows in its later steps.
        "tokens_per_row": statistics.mean(len(t) for t in last["constrained"]["tokens"]),
        "plain_tokens_per_row": statistics.mean(len(t) for t in last["plain"]["tokens"]),
        "complete_rows": last["constrained"]["complete"],
        "texts": [tokenizer.decode(t) for t in last["constrained"]["tokens"]],  # the last repeat's, under the schema
    }
