"""The Python half of scripts/gpu-check: the checks that need torch in-process, and the parsing.

Each subcommand prints what it finds for the log, and lines starting with "result: " that the
bash script gathers into its summary; it exits non-zero when its check fails. With --json, a
subcommand also stores its figures under its own key in that file (several share one file).
On a host without CUDA the GPU checks run small and eagerly on the CPU, to exercise this code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import itertools
import json
import logging
import math
import os
import pkgutil
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Dev extras the test suite imports; pytest-xdist only speeds it up.
DEV = ("pytest", "hypothesis", "transformers", "pytest-xdist")
IMPORT_NAMES = {"pytest-xdist": "xdist"}
PROMPTS = ["Once upon a time", "The", "Lily and Tom went to the park to play with a big red ball. They",
           "One day, a little bird", "Sam had a toy car. He liked to"]


def result(line: str) -> None:
    print(f"result: {line}", flush=True)


def store(path: str | None, key: str, figures: dict) -> None:
    if not path:
        return
    p = Path(path)
    data = json.loads(p.read_text()) if p.exists() else {}
    data[key] = figures
    p.write_text(json.dumps(data, indent=1) + "\n")


def prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two completions share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# -- versions -------------------------------------------------------------------------------------

def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def requirements() -> list[tuple[str, str]]:
    """(distribution, minimum version) of each run-time dependency in pyproject.toml."""
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.DOTALL | re.MULTILINE).group(1)
    return re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', block)


def installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def where(module: str) -> str:
    try:
        return str(Path(importlib.import_module(module).__file__).parent)
    except Exception as e:  # noqa: BLE001 (a broken install, whatever it raises, is reported)
        return f"does not import: {type(e).__name__}: {e}"


def versions(args) -> int:
    import platform

    print(f"python {platform.python_version()} ({sys.executable}) on {platform.system()} {platform.machine()}")
    problems, figures = [], {"python": platform.python_version()}
    for dist, minimum in requirements():
        have = installed(dist)
        print(f"  {dist} {have or 'MISSING'} (needs >={minimum}) {where(dist) if have else ''}")
        if have is None:
            problems.append(dist)
        elif version_tuple(have) < version_tuple(minimum):
            problems.append(f"{dist}>={minimum} (found {have})")
        figures[dist] = have
    print("dev: " + ", ".join(f"{d} {installed(d) or 'missing'}" for d in DEV)
          + f"; triton {installed('triton') or installed('pytorch-triton') or 'missing'}")
    # torch.compile builds C: Inductor's CPU kernels, and Triton's launcher for GPU ones.
    compiler = shutil.which("cc") or shutil.which("gcc")
    headers = (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()
    print(f"for torch.compile: C compiler {compiler or 'MISSING'}, Python.h {'found' if headers else 'MISSING'}")
    figures.update(c_compiler=compiler, python_h=headers)
    # Every module of the package, so that an import only one command needs is caught too.
    import tinygen

    failed = {}
    for mod in pkgutil.walk_packages(tinygen.__path__, "tinygen."):
        if mod.name == "tinygen.__main__":  # importing it runs the CLI
            continue
        try:
            importlib.import_module(mod.name)
        except ModuleNotFoundError as e:
            failed[mod.name] = (e.name or "?").split(".")[0]
        except Exception as e:  # noqa: BLE001 (any failure to import is what this looks for)
            failed[mod.name] = f"{type(e).__name__}: {e}"
    failed = {m: why for m, why in failed.items() if why != "transformers"}  # a dev extra: bench --compare only
    for name, why in failed.items():
        print(f"  {name} does not import: {why}")
    problems += sorted({why for why in failed.values() if " " not in why} - set(problems))
    if any(" " in why for why in failed.values()):
        problems.append("tinygen modules that do not import (see above)")
    cli = subprocess.run([sys.executable, "-m", "tinygen", "train", "--help"], check=False, capture_output=True, text=True, timeout=60)
    if cli.returncode != 0:
        problems.append("the CLI (`python -m tinygen train --help` failed; see the log)")
        print(cli.stderr[-2000:])
    figures.update(imports_ok=not problems, problems=problems)
    if problems:
        imports = f"MISSING: {'; '.join(problems)}"
        print(f"{imports}. Download their wheels into .whl/ (README, GPU check) and carry .whl to this machine; "
              f"gpu-check installs them.")
    else:
        imports = "imports ok"
        print("imports: every tinygen module imports, and the CLI starts")
    if "torch" in problems:
        result(imports)
        store(args.json, "versions", figures)
        return 1
    import torch

    figures.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    print(f"torch {torch.__version__} · CUDA {torch.version.cuda} · cuDNN {torch.backends.cudnn.version()}")
    line = f"torch {torch.__version__}"
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB")
        name, (major, minor) = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
        bf16 = torch.cuda.is_bf16_supported()
        b = torch.backends.cuda
        print(f"bf16 {'yes' if bf16 else 'no'}; SDPA enabled: flash {b.flash_sdp_enabled()}, mem-efficient "
              f"{b.mem_efficient_sdp_enabled()}, cudnn {b.cudnn_sdp_enabled()}, math {b.math_sdp_enabled()}")
        figures.update(device=name, capability=f"{major}.{minor}", bf16=bf16, cudnn=torch.backends.cudnn.version())
        line += f" · CUDA {torch.version.cuda} · cuDNN {torch.backends.cudnn.version()} · {name} (sm_{major}{minor}" \
                f"{', bf16' if bf16 else ', NO bf16'})"
    else:
        line += " · no CUDA GPU"
    result(f"{line} · python {platform.python_version()}")
    result(imports)
    if not (compiler and headers):
        result(f"no {'C compiler' if not compiler else 'Python.h'}: torch.compile (--compile, CUDA graphs) will fail")
    store(args.json, "versions", figures)
    return 1 if problems else 0


def wheels(args) -> int:
    """Exit 0 when some wheel names a distribution this python lacks or has older: then they
    install. Where everything is there already (a developer's own venv), they would only shadow it."""
    needed = []
    for wheel in args.paths:
        dist, version = Path(wheel).name.split("-")[:2]
        have = installed(dist)
        if have is None or version_tuple(have) < version_tuple(version):
            needed.append(f"{dist} {version} (here: {have or 'none'})")
    print("wheels needed: " + ", ".join(needed) if needed else "every wheel in .whl/ is installed here already")
    return 0 if needed else 1


# -- training text ----------------------------------------------------------------------------------

def text(args) -> int:
    """Short stories from a few word lists: enough text for a BPE vocabulary and a few hundred steps."""
    rng = random.Random(0)
    names = ["Tom", "Lily", "Spot", "Mia", "Ben", "Sue", "Max", "Anna"]
    things = ["a red ball", "a big box", "a small cat", "a blue kite", "a shiny stone", "a green frog", "a cake"]
    places = ["the park", "the garden", "the forest", "the beach", "the house", "the school"]
    feelings = ["happy", "sad", "scared", "excited", "tired", "surprised"]
    docs = []
    for _ in range(args.docs):
        a, b = rng.sample(names, 2)
        docs.append(f"Once upon a time, {a} went to {rng.choice(places)} with {b}. {a} found {rng.choice(things)}. "
                    f"\"Look!\" said {a}. {b} was {rng.choice(feelings)}. They played with it all day, and then "
                    f"they went home. {b} said, \"Can we come back tomorrow?\" {a} smiled and said yes.")
    Path(args.path).write_text("\n<|endoftext|>\n".join(docs) + "\n")
    return 0


# -- CUDA-graph decoder -----------------------------------------------------------------------------

class TorchLogs(logging.Handler):
    """Keeps what torch logs about recompiles and CUDA graphs it could not use."""

    def __init__(self):
        super().__init__()
        self.recompiles: list[str] = []
        self.cudagraph_skips: list[str] = []
        import torch

        torch._logging.set_logs(recompiles=True, perf_hints=True)
        # torch's loggers do not propagate to the root; listen on each one that has a handler.
        for name, log in list(logging.Logger.manager.loggerDict.items()):
            if isinstance(log, logging.Logger) and name.startswith("torch") and log.handlers:
                log.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name.endswith("__recompiles") and "Recompiling" in message:
            self.recompiles.append(message.splitlines()[0])
        if "skipping cudagraphs" in message.lower():
            self.cudagraph_skips.append(message.splitlines()[0])


def cudagraphs(args) -> int:
    import torch

    from tinygen.bench.bench import shape_config
    from tinygen.cli.common import load_model
    from tinygen.core.model import GPT
    from tinygen.generate.compiled import StaticDecoder
    from tinygen.generate.engine import stream
    from tinygen.generate.sampling import SamplingParams

    logs = TorchLogs()
    cuda = args.device.startswith("cuda")
    greedy = SamplingParams(temperature=0)
    net, tok = load_model(None, args.device, "bfloat16" if cuda else "float32")[:2]
    cases = [("bundled", net, tok.encode(PROMPTS[0]), True)]
    if cuda:
        torch.manual_seed(0)
        with torch.device(args.device):
            gpt2 = GPT(shape_config("gpt2")).to(torch.bfloat16).eval()
        # Random weights give near-ties that bf16 may flip, so its agreement is a figure, not a check.
        cases.append(("gpt2-shape", gpt2, torch.randint(0, 50257, (16,)).tolist(), False))

    def timed(model, prompt, n, decoder=None):
        """Greedy tokens, and the seconds of a second run: the first pays for allocations and kernel choice."""
        list(stream(model, prompt, greedy, n, decoder=decoder))
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = list(stream(model, prompt, greedy, n, decoder=decoder))
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    ok, figures = True, {}
    for name, model, prompt, checked in cases:
        decoder = StaticDecoder(model, compile=cuda)
        compile_s = decoder.warm_up()
        before = len(logs.recompiles)
        graphed, graphed_s = timed(model, prompt, args.tokens, decoder)
        timed(model, prompt[:-1] or [1, 2], 8, decoder)  # another prompt length must not recompile
        eager, eager_s = timed(model, prompt, args.tokens)
        agree = prefix(graphed, eager)
        n = args.tokens
        figures[name] = {"compile_s": compile_s, "graphed_tok_s": n / graphed_s, "eager_tok_s": n / eager_s,
                         "agree": agree, "tokens": n, "recompiles_after_warm_up": len(logs.recompiles) - before}
        passed = agree >= min(10, n) or not checked
        ok &= passed
        print(f"{name}: {'compiled' if cuda else 'eager static'} step ready in {compile_s:.1f} s; "
              f"{n / graphed_s:.0f} tok/s with it, {n / eager_s:.0f} tok/s without; greedy tokens agree {agree}/{n}"
              f"{'' if passed else ' (FAILED: fewer than 10)'}")
        result(f"{name}: {agree}/{n} agree, {n / graphed_s:.0f} vs {n / eager_s:.0f} tok/s eager, "
               f"ready in {compile_s:.0f} s")
    from torch._dynamo.utils import counters

    skips = max(len(logs.cudagraph_skips), counters["inductor"].get("cudagraph_skips", 0))
    decoding = sum(f["recompiles_after_warm_up"] for f in figures.values())
    for line in dict.fromkeys(logs.recompiles + logs.cudagraph_skips):
        print(f"  torch: {line}")
    figures.update(recompiles=len(logs.recompiles), recompiles_while_decoding=decoding, cudagraph_skips=skips,
                   messages=list(dict.fromkeys(logs.recompiles + logs.cudagraph_skips))[:20])
    # Each model's warm-up compiles the one shared step function, so a second model is a recompile by
    # design; one while decoding, or a skipped CUDA graph, is a finding.
    flag = " (a finding: see the log)" if skips or decoding else ""
    result(f"cudagraph skips {skips}, recompiles while decoding {decoding} "
           f"({len(logs.recompiles) - decoding} in warm-ups){flag}")
    store(args.json, "cudagraphs", figures)
    return 0 if ok else 1


# -- attention masks and batched generation -----------------------------------------------------------

def attention_backends(device: str, dtype) -> tuple[bool, dict]:
    """Each SDPA backend on the boolean masks the engine builds, against a float64 reference."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    B, H, S, D, T = 4, 6, 96, 64, 8
    pos = torch.tensor([7, 40, 95, 63], device=device)  # each row's newest position
    slots = torch.arange(S, device=device)
    window = pos[:, None] - T + 1 + torch.arange(T, device=device)  # (B, T): a row's last T positions
    cases = {  # name: (batch, queries, mask)
        "decode (B,1,1,S)": (B, 1, (slots <= pos[:, None])[:, None, None, :]),  # engine.decode
        "window (B,1,T,S)": (B, T, (slots <= window[:, :, None])[:, None]),  # CacheSlots.mask with T > 1
        "static (1,1,1,S)": (1, 1, (slots <= pos[:1, None])[:, None, None, :]),  # StaticDecoder
    }
    names = ["default", *(b for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
                          if hasattr(SDPBackend, b))]
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-3
    ok, figures = True, {}
    for case, (b, t, mask) in cases.items():
        q = torch.randn(b, H, t, D, device=device, dtype=dtype)
        k, v = (torch.randn(b, H, S, D, device=device, dtype=dtype) for _ in range(2))
        scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(D)
        reference = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double()
        row = {}
        for name in names:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel(getattr(SDPBackend, name)) if name != "default" else nullcontext():
                        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    diff = (out.double() - reference).abs().max().item()
                    row[name] = diff
                    if not diff <= tolerance:  # NaN counts as wrong
                        ok = False
                except RuntimeError as e:
                    reasons = [str(w.message).splitlines()[0] for w in caught if "support" in str(w.message)]
                    row[name] = "refused: " + (reasons[0] if reasons else str(e).splitlines()[0])
                    ok &= name not in ("default", "MATH")  # these two must always run
        figures[case] = row
        shown = ", ".join(f"{n.removesuffix('_ATTENTION')} {f'{v:.4f}' if isinstance(v, float) else v}"
                          for n, v in row.items())
        print(f"{case} {str(dtype).removeprefix('torch.')}: {shown}")
        result(f"{case}: " + ", ".join(f"{n.removesuffix('_ATTENTION').lower()} "
                                       f"{f'{v:.3f}' if isinstance(v, float) else 'refused'}" for n, v in row.items()))
    return ok, figures


def batched_vs_alone(device: str, dtype_name: str, n: int) -> tuple[bool, dict]:
    """Rows of different prompt lengths, decoded together (and with slots refilled), against each alone."""
    from tinygen.cli.common import load_model
    from tinygen.generate.engine import generate_batch, stream
    from tinygen.generate.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    net, tok = load_model(None, device, dtype_name)[:2]
    prompts = [tok.encode(p) for p in PROMPTS]
    alone = [list(stream(net, p, greedy, n)) for p in prompts]
    ok, figures = True, {}
    for mode, kw in (("together", {}), ("two slots, refilled", {"batch_size": 2})):
        batched = generate_batch(net, prompts, greedy, n, **kw)
        agree = [prefix(a, b) for a, b in zip(batched, alone)]
        same = sum(a == n for a in agree)
        # A mask or cache bug shows at once; a bf16 near-tie may flip a token later on.
        ok &= min(agree) >= min(4, n)
        figures[mode] = agree
        print(f"{dtype_name} {mode}: tokens agreeing with each row alone: {agree} (of {n})")
        result(f"batched {dtype_name} {mode}: {same}/{len(prompts)} rows identical, first divergence at "
               f"{min(agree) if same < len(prompts) else 'none'}")
    return ok, figures


def masks(args) -> int:
    import torch

    cuda = args.device.startswith("cuda")
    ok, figures = attention_backends(args.device, torch.bfloat16 if cuda else torch.float32)
    figures = {"sdpa": figures}
    for dtype_name in ("float32", "bfloat16") if cuda else ("float32",):
        passed, figures[f"batched_{dtype_name}"] = batched_vs_alone(args.device, dtype_name, args.tokens)
        ok &= passed
    store(args.json, "masks", figures)
    return 0 if ok else 1


# -- parsing what the CLI wrote -------------------------------------------------------------------------

def train_check(args) -> int:
    """The train and resume runs' samples and losses, and eval's agreement with training's last validation."""
    lines = Path(args.log).read_text(errors="replace").splitlines()
    samples = sum(1 for before, line in itertools.pairwise(lines)
                  if before.startswith("eval @") and line.startswith("  ") and line.strip())
    records = [json.loads(line) for line in Path(args.metrics).read_text().splitlines() if line.strip()]
    steps = [r for r in records if "train_loss" in r]
    vals = [r for r in records if r.get("val_loss") is not None]
    problems = []
    if samples == 0:
        problems.append("no evaluation sample in the output")
    if not steps or steps[-1]["step"] != args.steps:
        problems.append(f"expected {args.steps} steps, the metrics end at {steps[-1]['step'] if steps else 0}")
    if not all(math.isfinite(r["train_loss"]) for r in steps):
        problems.append("a training loss is not finite")
    speed = sorted(r["tokens_per_s"] for r in steps)[len(steps) // 2] if steps else 0
    line = (f"{len(steps)} steps, loss {steps[0]['train_loss']:.2f} → {steps[-1]['train_loss']:.2f}, "
            f"{speed:,.0f} tok/s, {samples} samples") if steps else "no steps"
    if vals:
        line += f", val {vals[-1]['val_loss']:.3f}"
    if args.eval:
        score = json.loads(Path(args.eval).read_text())
        line += f"; eval --val-split {score['loss']:.3f}"
        if vals and not math.isclose(score["loss"], vals[-1]["val_loss"], rel_tol=1e-3):
            problems.append(f"eval's loss {score['loss']:.5f} is not training's last validation {vals[-1]['val_loss']:.5f}")
    for p in problems:
        print(f"FAILED: {p}")
    result(line)
    return 1 if problems else 0


def bench_figures(args) -> int:
    """The few figures of `tinygen bench --json` runs that belong in the summary. Runs of different
    sections of one model merge into what one run of them all writes (--save)."""
    r = {}
    for path in args.paths:
        r.update(json.loads(Path(path).read_text()))
    if args.save:
        Path(args.save).write_text(json.dumps(r, indent=2) + "\n")
    parts = [f"{r['model'].split('/')[-1]} {r['dtype']}"]
    if "compile_seconds" in r:
        parts.append(f"compile {r['compile_seconds']:.0f} s")
    if d := r.get("decode"):
        ratio = d.get("ratio", {}).get("decode")
        parts.append(f"decode {d['tinygen']['decode_tok_s']:,.0f} tok/s" + (f" ({ratio:.2f}x hf)" if ratio else ""))
        parts.append(f"first token {d['tinygen']['first_token_ms']:.1f} ms")
        if "greedy_agreement" in d:
            parts.append(f"greedy {d['greedy_agreement']}")
        if rl := d.get("roofline"):
            parts.append(f"{rl.get('of_peak', rl['of_measured']):.0%} of {'peak' if 'of_peak' in rl else 'measured'} "
                         f"bandwidth")
    for row in r.get("batch", {}).get("rows", [])[-1:]:
        ratio = f" ({row['ratio']:.2f}x hf)" if "ratio" in row else ""
        parts.append(f"batch {row['batch']} {row['tinygen_tok_s']:,.0f} tok/s{ratio}")
    if t := r.get("train"):
        mfu = t["tinygen"].get("mfu")
        parts.append(f"train {t['tinygen']['tok_s']:,.0f} tok/s" + (f", MFU {mfu:.0%}" if mfu else ""))
    result(" · ".join(parts))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("versions", help="python, torch, GPU and package versions; every import tinygen needs")
    p.add_argument("--json")
    p = sub.add_parser("wheels", help="exit 0 if this python lacks one of these wheels' distributions")
    p.add_argument("paths", nargs="+")
    p = sub.add_parser("text", help="write a small story corpus to train on")
    p.add_argument("path")
    p.add_argument("--docs", type=int, default=400)
    for name, help in (("cudagraphs", "the CUDA-graph decode step against the eager one"),
                       ("masks", "SDPA backends on boolean masks; batched generation against rows alone")):
        p = sub.add_parser(name, help=help)
        p.add_argument("--device", default="cuda")
        p.add_argument("--tokens", type=int, default=64)
        p.add_argument("--json")
    p = sub.add_parser("train-check", help="samples and losses of the train runs; eval against training's last val")
    p.add_argument("--log", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--eval")
    p = sub.add_parser("bench-figures", help="the summary line of `tinygen bench --json` files, merged")
    p.add_argument("paths", nargs="+")
    p.add_argument("--save", help="write the merged figures here")
    args = parser.parse_args()
    os.environ.setdefault("NO_COLOR", "1")
    return {"versions": versions, "wheels": wheels, "text": text, "cudagraphs": cudagraphs, "masks": masks,
            "train-check": train_check, "bench-figures": bench_figures}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
