"""Batch-mode input: lines of prompts, or JSON requests, into Requests with a seed for every row.

A plain line is one prompt (an empty one is a fresh document), so there is one completion per line.
A JSON line is {"prompt": ..., and any sampling field, "max_new_tokens", "stop" or "seed"}, and at
most one constraint: "json_schema", "regex", "choice", "grammar", or OpenAI's "response_format"
(CONSTRAINT_FIELDS); blank ones are skipped. Every row gets its own seed: a request's "seed" gives seed + j to its j-th sample, else
--seed gives seed + i * num_samples + j to the j-th sample of request i, so no two rows share a stream
and none depends on its neighbours; with neither, rows are seeded afresh.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import fields, replace

from tinygen.errors import TinygenError
from tinygen.generate.constrain import ANY_OBJECT, Constraint
from tinygen.generate.sampling import SamplingParams
from tinygen.generate.textgen import Request

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
CONSTRAINT_FIELDS = ("json_schema", "regex", "choice", "grammar", "response_format")
REQUEST_FIELDS = SAMPLING_FIELDS | {"prompt", "max_new_tokens", "stop", "seed", *CONSTRAINT_FIELDS}


def parse_requests(lines: Iterable[str], base: Request, *, jsonl: bool, num_samples: int = 1) -> list[Request]:
    """Requests in input order, num_samples rows for each; base gives the command's settings."""
    parsed = []
    for n, line in enumerate(lines, 1):
        if not jsonl:
            parsed.append(replace(base, prompt=line, seed=None))
        elif line.strip():
            parsed.append(_json_request(line, n, base))
    if not parsed:
        raise TinygenError("batch mode got no prompts")
    return expand(parsed, base.seed, num_samples)


def expand(requests: list[Request], seed: int | None, num_samples: int) -> list[Request]:
    """num_samples rows per request, each with a seed of its own (see the module docstring)."""
    rows = []
    for i, r in enumerate(requests):
        for j in range(num_samples):
            if r.seed is not None:
                row_seed = r.seed + j
            else:
                row_seed = None if seed is None else seed + i * num_samples + j
            rows.append(replace(r, seed=row_seed))
    return rows


def _json_request(line: str, n: int, base: Request) -> Request:
    try:
        obj = json.loads(line)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise TinygenError(f'line {n} of the input is not a JSON object with a "prompt"')
    if not isinstance(obj["prompt"], str):
        raise TinygenError(f'line {n}: "prompt" must be a string')
    unknown = set(obj) - REQUEST_FIELDS
    if unknown:
        raise TinygenError(f"line {n}: unknown fields {', '.join(sorted(unknown))}")
    try:
        params = replace(base.params, **{k: _number(v, k) for k, v in obj.items() if k in SAMPLING_FIELDS})
    except TinygenError as e:
        raise TinygenError(f"line {n}: {e}") from None
    stop = obj.get("stop", base.stop)
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop):
        raise TinygenError(f'line {n}: "stop" must be a string or a list of strings')
    max_new = obj.get("max_new_tokens", base.max_new_tokens)
    if not _is_int(max_new) or max_new < 1:
        raise TinygenError(f'line {n}: "max_new_tokens" must be a positive integer')
    seed = obj.get("seed")
    if seed is not None and not _is_int(seed):
        raise TinygenError(f'line {n}: "seed" must be an integer')
    try:
        constraint = request_constraint(obj) or base.constraint
        return Request(obj["prompt"], params, max_new, tuple(stop), seed, constraint)
    except TinygenError as e:
        raise TinygenError(f"line {n}: {e}") from None


def request_constraint(obj: dict) -> Constraint | None:
    """The one constraint a JSON request names, in any of the forms CONSTRAINT_FIELDS lists."""
    named = [k for k in CONSTRAINT_FIELDS if obj.get(k) is not None]
    if len(named) > 1:
        raise TinygenError(f"give one constraint, not {' and '.join(map(json.dumps, named))}")
    if not named:
        return None
    key, value = named[0], obj[named[0]]
    return _response_format(value) if key == "response_format" else Constraint.of(key, value)


def _response_format(value) -> Constraint | None:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}}}."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_schema(ANY_OBJECT)
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise TinygenError('"response_format" of type json_schema needs {"json_schema": {"schema": {...}}}')
        return Constraint.json_schema(inner["schema"])
    raise TinygenError('"response_format" must be {"type": "text"}, {"type": "json_object"} or '
                       '{"type": "json_schema", "json_schema": {"schema": {...}}}')


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value, name: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TinygenError(f'"{name}" must be a number, got {json.dumps(value)}')
    if name == "top_k" and not float(value).is_integer():
        raise TinygenError(f'"top_k" must be an integer, got {json.dumps(value)}')
    return int(value) if name == "top_k" else float(value)
