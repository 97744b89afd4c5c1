"""Reliability: the checkpoint loader under thousands of corruptions, and checkpoints that
survive kill -9 in the middle of a write.

The fuzz runs in a child process of its own, so that a hang (in Rust or C code too) ends in a
traceback dump instead of a stuck test run, and so that an address-space limit can prove that no
corruption makes the loader allocate gigabytes: such an allocation fails there, and the failure
is reported like any other non-TinygenError.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

from tinygen.core.checkpoint import load_model, read_info, save_checkpoint
from tinygen.core.config import ModelConfig

from conftest import make_model

TESTS = Path(__file__).resolve().parent
FUZZ_CASES = 2500
CASE_TIMEOUT_S = 20  # a case is ~10 ms; far past this is a hang
HEADROOM = 1 << 30  # address space the fuzz may use beyond what torch and the first load took

# Values that are wrong for most fields and right for a few: types, signs, sizes, non-finite floats.
EVIL = [None, True, False, 0, -1, 1, 2, 3, 7, 2**31, 2**63, 10**30, -(10**18), 0.5, -0.0, 1e308,
        float("inf"), float("nan"), "", "x", "6", "rope", "gpt2", "<|end|>", "A" * 300, [], {}, [1, 2],
        ["a", "b"], ["a", "b", "c"], {"a": 1}, [0], [-1], [2**40, 2**40], "F16", "BF16", "I32", "U8", "BOOL",
        "F64", "QQ==", "AA==", "!!!"]
# Metadata values that are not even the JSON the field should hold.
RAW = ["", "{", "null", "[]", "1e999", "NaN", '"text"', "[" * 50_000 + "]" * 50_000, "\x00\xff", "{}"]
PROBE = "Once upon a time, Spot saw 3 big dogs. Café 😀 日本語!\n"


# -- the mutations ---------------------------------------------------------------------------------


def split_file(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_file(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_bytes(rng: random.Random, data: bytes, header_len: int) -> tuple[bytes, str]:
    buf = bytearray(data)
    # Half the mutations land in the header, where they change meaning instead of weights.
    pos = rng.randrange(header_len) if rng.random() < 0.5 else rng.randrange(len(buf))
    op = rng.randrange(6)
    if op == 0:
        for _ in range(rng.randint(1, 8)):
            p = rng.randrange(header_len) if rng.random() < 0.5 else rng.randrange(len(buf))
            buf[p] ^= 1 << rng.randrange(8)
        return bytes(buf), "flip bits"
    if op == 1:
        return bytes(buf[: rng.randrange(len(buf))]), "truncate"
    if op == 2:
        n = rng.randint(1, 64)
        src = rng.randrange(len(buf))
        buf[pos : pos + n] = buf[src : src + n]
        return bytes(buf), "splice a chunk over another"
    if op == 3:
        n = rng.randint(1, 64)
        if rng.random() < 0.5:
            return bytes(buf[:pos] + rng.randbytes(n) + buf[pos:]), "insert bytes"
        return bytes(buf[:pos] + buf[pos + n :]), "delete bytes"
    if op == 4:
        n = rng.randint(1, 32)
        fill = rng.choice([b"\x00", b"\xff", None])
        buf[pos : pos + n] = fill * n if fill else rng.randbytes(n)
        return bytes(buf), "overwrite"
    length = rng.choice([0, 1, header_len - 1, header_len + 8, len(buf), 2**40, 2**64 - 1])
    return struct.pack("<Q", length) + bytes(buf[8:]), f"header length {length}"


def mutate_tree(rng: random.Random, node, path: str = "") -> str:
    """Change one node somewhere below node (a dict or list): replace it, delete it or add one."""
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    if not keys:
        if isinstance(node, dict):
            node["x"] = rng.choice(EVIL)
        else:
            node.append(rng.choice(EVIL))
        return f"{path}: add to empty"
    key = rng.choice(keys)
    child = node[key]
    if isinstance(child, (dict, list)) and child and rng.random() < 0.75:
        return mutate_tree(rng, child, f"{path}.{key}")
    op = rng.random()
    if op < 0.6:
        node[key] = rng.choice(EVIL)
        return f"{path}.{key} = {node[key]!r:.40}"
    if op < 0.8:
        del node[key]
        return f"{path}.{key}: delete"
    if isinstance(node, dict):
        node[f"{key}_extra"] = copy.deepcopy(child)
    else:
        node.insert(rng.randrange(len(node) + 1), copy.deepcopy(child))  # a duplicate (a repeated rank, say)
    return f"{path}.{key}: duplicate"


def mutate_tokenizer(rng: random.Random, tok: dict) -> str:
    """Mutations that keep the tokenizer well-typed but wrong, where a random value rarely lands."""
    ranks = tok["ranks"]
    op = rng.randrange(6)
    if op == 0:
        i = rng.randrange(len(ranks))
        ranks[i] = base64.b64encode(rng.randbytes(rng.randint(1, 4))).decode()
        return f"rank {i} = random bytes"
    if op == 1:
        ranks.pop(rng.randrange(256))
        return "drop a single-byte rank"
    if op == 2:
        tok["pattern"] = rng.choice(["", "a*", "(", r"\w+", ".", r"(\w+)+\$", r"\p{L}+|\s+", "[", r"(?<=x)y|."])
        return f"pattern = {tok['pattern']!r}"
    if op == 3:
        name = rng.choice(list(tok["special"]))
        tok["special"][name] = rng.choice([-1, 0, 5, len(ranks) + 50, 2**32, 2**64, "1", None])
        return f"special {name} = {tok['special'][name]!r}"
    if op == 4:
        tok["special"][rng.choice(["", "<|endoftext|>x", "a"])] = len(ranks) + len(tok["special"])
        return "extra special token"
    template = tok.setdefault("chat_template", {"roles": {"system": ["<|system|>", "<|end|>"]}, "stop": []})
    return "chat template: " + mutate_tree(rng, template)


def mutate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    header, body = split_file(data)
    if rng.random() < 0.35:
        return mutate_bytes(rng, data, 8 + len(data) - len(body))
    meta = header["__metadata__"]
    fields = {k: json.loads(v) for k, v in meta.items() if k in ("config", "tokenizer", "provenance")}
    section = rng.choices(["config", "tokenizer", "tokenizer-typed", "provenance", "raw", "version", "tensors"],
                          weights=[25, 20, 15, 5, 10, 5, 20])[0]
    if section == "tensors":
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        what = "tensors" + mutate_tree(rng, tensors)
        header = {"__metadata__": meta, **tensors}
    elif section == "raw":
        key = rng.choice(list(meta))
        meta[key] = rng.choice(RAW)
        what = f"metadata {key} = {meta[key][:20]!r}"
    elif section == "version":
        meta["format_version"] = rng.choice(["abc", "99", "-1", "1e3", "", " 1", "٣", "9" * 5000])
        what = f"format_version = {meta['format_version'][:20]!r}"
    elif section == "tokenizer-typed":
        what = mutate_tokenizer(rng, fields["tokenizer"])
    else:
        what = section + mutate_tree(rng, fields[section])
    for k, v in fields.items():
        if k in meta and section not in ("raw", "version"):
            meta[k] = json.dumps(v)
    return join_file(header, body), what


# -- the child that runs the cases -----------------------------------------------------------------


def run_fuzz(args: dict) -> None:
    """Entry point of the fuzz child: prints one JSON report line."""
    import faulthandler
    import resource

    from tinygen.cli.info import rows
    from tinygen.core.checkpoint import load_tokenizer
    from tinygen.errors import TinygenError

    def attempt(path: Path) -> str:
        info = read_info(path)
        tok = load_tokenizer(info=info)
        json.dumps(info.summary(tok))  # what `tinygen info` shows must render, too
        rows(info, tok)
        net, tok, info = load_model(path)
        ids = tok.encode(PROBE)
        assert tok.decode(ids) == PROBE
        with torch.no_grad():
            logits = net(torch.tensor([ids[: info.config.block_size]]))
        assert logits.shape[-1] == info.config.vocab_size
        return "loaded"

    bases = [Path(p).read_bytes() for p in args["bases"]]
    case_path = Path(args["dir"]) / "case.safetensors"
    for base in args["bases"]:
        attempt(Path(base))  # warm-up: the first load's imports and buffers are not the fuzz's
    status = Path("/proc/self/status").read_text()
    vm_size = int(status.split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + HEADROOM, resource.RLIM_INFINITY))
    outcomes: dict[str, int] = {}
    messages: dict[str, int] = {}
    failures = []
    slowest = 0.0
    for case in range(args["cases"]):
        rng = random.Random(case)
        data, what = mutate(rng, bases[case % len(bases)])
        case_path.unlink(missing_ok=True)  # a new file is ten times faster than truncating the old one
        case_path.write_bytes(data)
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        print(f"case {case}: {what[:100]}", file=sys.stderr, flush=True)  # names the case a hang dump follows
        start = time.perf_counter()
        try:
            outcome = attempt(case_path)
        except TinygenError as e:
            outcome = "error"
            message = str(e)
            key = message.replace(str(case_path), "PATH")[:90]
            messages[key] = messages.get(key, 0) + 1
            if "\n" in message or not message.strip():
                failures.append({"case": case, "what": what, "error": f"not one line: {message!r}"})
        except BaseException as e:  # noqa: BLE001 (the point: anything else is a failure, even a Rust panic)
            outcome = "other"
            failures.append({"case": case, "what": what, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        faulthandler.cancel_dump_traceback_later()
        slowest = max(slowest, time.perf_counter() - start)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(json.dumps({"outcomes": outcomes, "failures": failures, "slowest_s": slowest,
                      "messages": sorted(messages.items(), key=lambda kv: -kv[1])}))


def test_checkpoint_loader_survives_mutations(tmp_path, tokenizer, chat_tokenizer):
    """Every corruption ends in a one-line TinygenError or a model that works: never another
    exception, a hang, or a large allocation."""
    rope = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=chat_tokenizer.n_vocab)
    gpt2 = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=16, vocab_size=tokenizer.n_vocab, arch="gpt2")
    bases = [save_checkpoint(tmp_path / "rope.safetensors", make_model(rope), chat_tokenizer, {"steps": 3, "loss": 2.5}),
             save_checkpoint(tmp_path / "gpt2.safetensors", make_model(gpt2), tokenizer, {"data": "test"})]
    args = {"bases": [str(p) for p in bases], "dir": str(tmp_path), "cases": FUZZ_CASES}
    code = f"import sys, json; sys.path.insert(0, {str(TESTS)!r}); import test_reliability as t; t.run_fuzz(json.loads(sys.argv[1]))"
    p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"the fuzz child died (a hang dumps its traceback):\n{p.stderr[-4000:]}"
    report = json.loads(p.stdout.splitlines()[-1])
    assert report["failures"] == [], json.dumps(report["failures"][:20], indent=1)
    # Both outcomes happen, so the fuzz reaches past the header checks into loading.
    assert report["outcomes"].get("error", 0) > FUZZ_CASES // 2, report
    assert report["outcomes"].get("loaded", 0) > 50, report
    assert report["slowest_s"] < 5, report


# -- kill -9 during a save ----------------------------------------------------------------------------

_WRITER = r"""
import sys, torch
from tinygen.core.checkpoint import save_checkpoint
from tinygen.core.config import ModelConfig
from tinygen.core.model import GPT
from tinygen.core.tokenizer import Tokenizer
import json

tok = Tokenizer.from_dict(json.load(open(sys.argv[2])))
net = GPT(ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=64, vocab_size=tok.n_vocab))  # ~13 MB
step = int(sys.argv[3])
while True:
    step += 1
    with torch.no_grad():
        net.transformer.wte.weight[0, 0] = step  # the weights say which save they belong to, as the header does
    save_checkpoint(sys.argv[1], net, tok, {"step": step})
    print(step, flush=True)
"""


def test_kill_9_mid_save_keeps_the_previous_checkpoint(tmp_path, tokenizer):
    """A writer killed at random moments (most land mid-write): the file is always the last whole
    save, weights and header alike; the temp folder is hidden, never named like a model, and the
    next save of the same file removes it."""
    out = tmp_path / "m.safetensors"
    tok_file = tmp_path / "tok.json"
    tok_file.write_text(json.dumps(tokenizer.to_dict()))
    rng = random.Random(9)
    last, mid_write, rounds = 0, 0, 0
    while mid_write < 3 and rounds < 12:
        rounds += 1
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(out), str(tok_file), str(last)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()  # one whole save first (it also clears the last round's temps)
            assert line, "the writer died before its first save"
            first = int(line)
            time.sleep(rng.uniform(0, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        saved = max([first, *map(int, child.stdout.read().split())])
        temp = tmp_path / f".m.safetensors.{child.pid}.tmp"
        temps = {p for p in tmp_path.iterdir() if p.name not in ("m.safetensors", "tok.json")}
        assert temps <= {temp}, f"stale temp files: {temps}"
        mid_write += temp.exists()

        info = read_info(out)
        step = info.provenance["step"]
        assert step in (saved, saved + 1), (step, saved)  # the last whole save, or one finished after its print
        net, _, _ = load_model(out)
        assert net.transformer.wte.weight[0, 0].item() == step  # weights and header from the same save
        assert [p.name for p in tmp_path.glob("*.safetensors")] == ["m.safetensors"]
        last = step
    assert mid_write >= 3, f"only {mid_write} of {rounds} kills landed mid-write"
    save_checkpoint(out, net, tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "tok.json"]
