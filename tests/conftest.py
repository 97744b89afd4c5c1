"""Shared fixtures: a tokenizer trained in-process on a few lines, tiny models saved to disk, and
the CLI run the way users run it.

Everything here is made by the tests themselves (modelfiles.py builds the files of other tools);
../shared is only read by the real-model checks, which skip when it is absent.

Starting Python and importing torch costs about 2 s per process, so most CLI cases go through a
small fork server (the `cli` fixture). One process imports torch and tinygen once. For each case
it forks a fresh child and runs `tinygen.cli.app.main()` there, with the case's argv, environment
and stdin, and with fds 0, 1 and 2 on the case's own files. Each child is a real process with real
file descriptors and a real exit status; only interpreter start-up is shared. `run_real` runs
`python -m tinygen` itself, for what depends on interpreter start-up or shutdown.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from modelfiles import with_byte_pairs, write_gpt2_files

from tinygen.core.checkpoint import save_checkpoint
from tinygen.core.config import ModelConfig
from tinygen.core.model import GPT
from tinygen.core.template import with_chat_template
from tinygen.core.tokenizer import Tokenizer

# Every command these tests run is pinned to the CPU: the suite must pass unchanged on a GPU host,
# where `--device auto` would run CUDA in bf16 and fail for reasons that are not the test's.
# Commands read $TINYGEN_DEVICE where no --device is given; every child process inherits it. A test
# about the GPU passes --device cuda, which wins, and skips without CUDA.
os.environ["TINYGEN_DEVICE"] = "cpu"

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT2_TOKENIZER = SHARED / "gpt2-tokenizer"

STORY_LINES = [
    "Once upon a time, there was a little dog named Spot.",
    "Spot liked to run in the park with his friend Tom.",
    "One day, Tom found a big red ball under a tree.",
    "They played all day and were very happy.",
    "The sun was warm and the sky was blue. Lily smiled.",
    "\"Can I play too?\" asked the little cat. \"Yes!\" said Spot.",
    "Café naïve – emoji 😀 and 日本語 appear too, so bytes matter.",
]


# `tinygen train` flags for a model that trains in seconds on a CPU.
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--vocab-size", "300",
        "--batch-size", "4", "--eval-every", "5", "--warmup-steps", "2"]


def make_model(config: ModelConfig, seed: int = 0, scale: float = 1.0) -> GPT:
    """A random model; scale > 1 sharpens its logits so greedy argmax is far from ties."""
    torch.manual_seed(seed)
    model = GPT(config)
    if scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() > 1:
                    p.mul_(scale)
    return model.eval()


def q8_0_like(n: int, k: int) -> torch.Tensor:
    """A float32 matrix as a GGUF's Q8_0 one loads: int8 codes times a float16 scale per 32 inputs,
    each block's largest code at ±127 (as ggml quantizes)."""
    codes = torch.randint(-127, 128, (n, k // 32, 32))
    codes[:, :, 5] = torch.where(torch.rand(n, k // 32) < 0.5, 127, -127)
    scales = (torch.rand(n, k // 32) * 0.02 + 1e-4).half().float()
    return (codes * scales[..., None]).reshape(n, k)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(STORY_LINES * 20, vocab_size=400)


@pytest.fixture(scope="session")
def tokens(tokenizer):
    """The story lines as training tokens, for the training loop's tests."""
    from tinygen.training import data as data_lib

    return data_lib.encode_documents(STORY_LINES * 30, tokenizer)


@pytest.fixture()
def small_config(tokenizer) -> ModelConfig:
    """A two-block model the training loop's tests train in a few seconds."""
    return ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.n_vocab, dropout=0.1)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    """A small plain-text corpus for `tinygen train`: the story lines as documents."""
    path = tmp_path / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(STORY_LINES * 12))
    return path


@pytest.fixture(scope="session")
def rope_config(tokenizer) -> ModelConfig:
    return ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=tokenizer.n_vocab)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory, tokenizer, rope_config) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_checkpoint(path, make_model(rope_config, scale=3.0), tokenizer, {"data": "random weights (test)", "steps": 0})
    return path


@pytest.fixture(scope="session")
def gpt2_arch_path(tmp_path_factory, tokenizer) -> Path:
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=tokenizer.n_vocab, arch="gpt2")
    path = tmp_path_factory.mktemp("models") / "tiny-gpt2.safetensors"
    save_checkpoint(path, make_model(config, seed=1, scale=3.0), tokenizer)
    return path


@pytest.fixture(scope="session")
def gpt2_files(tmp_path_factory, tokenizer) -> Path:
    """A folder of vocab.json + merges.txt as large as GPT-2's (50,257 ids, <|endoftext|> last): the
    trained tokenizer's tokens, then two-byte ones."""
    return write_gpt2_files(tmp_path_factory.mktemp("gpt2-files"), with_byte_pairs(tokenizer.ranks, 50256))


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory, gpt2_files) -> Path:
    """A small random GPT2LMHeadModel saved by transformers itself, with gpt2_files' vocab.json and
    merges.txt."""
    transformers = pytest.importorskip("transformers")
    import shutil

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # sharper logits, so greedy decoding has clear winners
        for p in hf.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    out = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    hf.save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_files / name, out / name)
    return out


@pytest.fixture(scope="session")
def chat_tokenizer(tokenizer):
    tok, added = with_chat_template(tokenizer)
    assert added == 0  # tinygen tokenizers reserve the chat tokens from the start
    return tok


@pytest.fixture(scope="session")
def chat_model_path(tmp_path_factory, chat_tokenizer):
    config = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=chat_tokenizer.n_vocab)
    path = tmp_path_factory.mktemp("chat") / "chat.safetensors"
    model = make_model(config, seed=3, scale=3.0)
    with torch.no_grad():  # zero rows give special tokens a logit of 0, far below the top: replies never end early
        model.transformer.wte.weight[sorted(chat_tokenizer.special_ids)] = 0
    save_checkpoint(path, model, chat_tokenizer, {"data": "random weights (test)"})
    return path


# -- the command line, as users run it ------------------------------------------------------------

# Environment variables that would change what the CLI does or how it looks.
_DROP_ENV = ("TINYGEN_MODEL", "TINYGEN_STATS", "PYTHONUNBUFFERED", "FORCE_COLOR", "CLICOLOR_FORCE", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


@dataclass
class Run:
    rc: int
    raw: bytes  # stdout as bytes
    err: str

    @property
    def out(self) -> str:
        return self.raw.decode("utf-8")  # strict: stdout must always be valid UTF-8

    @property
    def text(self) -> str:
        """The one completion printed by `sample`, without the newline that ends it."""
        assert self.rc == 0, f"exit {self.rc}, stderr: {self.err!r}"
        assert self.out.endswith("\n"), self.out
        return self.out[:-1]


def run_real(*args, input: bytes | str | None = None, env: dict | None = None, timeout: float = 120) -> Run:
    """`python -m tinygen ARGS` in a fresh process; stdin is /dev/null unless input is given."""
    kw = {"stdin": subprocess.DEVNULL} if input is None else {"input": input.encode() if isinstance(input, str) else input}
    p = subprocess.run([sys.executable, "-m", "tinygen", *map(str, args)], capture_output=True,
                       env=env or clean_env(), timeout=timeout, **kw)
    return Run(p.returncode, p.stdout, p.stderr.decode("utf-8", "replace"))


_FORK_SERVER = r"""
import base64, json, os, signal, sys, tempfile, traceback

# Keep the protocol on fds of its own; fds 0 and 1 become /dev/null so that the server never
# buffers anything in sys.stdin or sys.stdout that a child could inherit.
proto_in = os.fdopen(os.dup(0), "rb")
proto_out = os.fdopen(os.dup(1), "w")
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 0)
os.dup2(devnull, 1)

import torch  # noqa: F401  (the expensive import, paid once; no torch op runs before a fork)
import tinygen.core.checkpoint, tinygen.core.model, tinygen.generate.engine, tinygen.generate.textgen  # noqa: F401
from tinygen.cli.app import main

import importlib
for name in sys.argv[1:]:  # more to import once, for a module whose cases all need it (ForkServer's preload)
    importlib.import_module(name)

work = tempfile.mkdtemp(prefix="tinygen-fork-")
out_path, err_path, in_path = (os.path.join(work, n) for n in ("out", "err", "in"))
for line in proto_in:
    case = json.loads(line)
    if case["stdin"] is not None:
        with open(in_path, "wb") as f:
            f.write(base64.b64decode(case["stdin"]))
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(case["timeout"])
            fd_in = os.open(in_path if case["stdin"] is not None else os.devnull, os.O_RDONLY)
            fd_out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            fd_err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd_in, 0)
            os.dup2(fd_out, 1)
            os.dup2(fd_err, 2)
            os.environ.clear()
            os.environ.update(case["env"])
            sys.argv = ["tinygen", *case["argv"]]
            try:
                main()
                code = 0
            except SystemExit as e:  # what the interpreter would do with it
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
            try:
                sys.stdout.flush()
            except BaseException:
                traceback.print_exc()
                code = code or 120
            sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    with open(out_path, "rb") as f:
        out = f.read()
    with open(err_path, "rb") as f:
        err = f.read()
    result = {"rc": os.waitstatus_to_exitcode(status), "stdout": base64.b64encode(out).decode(),
              "stderr": base64.b64encode(err).decode()}
    proto_out.write(json.dumps(result) + "\n")
    proto_out.flush()
"""


class ForkServer:
    def __init__(self, preload: tuple[str, ...] = ()) -> None:
        """preload: modules the server imports besides tinygen's, so that no case pays for them."""
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-c", _FORK_SERVER, *preload], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=clean_env())

    def __call__(self, *args, input: bytes | str | None = None, env: dict | None = None, timeout: int = 60) -> Run:
        """Like run_real, in a child forked from the server."""
        if isinstance(input, str):
            input = input.encode()
        case = {"argv": [str(a) for a in args], "env": env or clean_env(), "timeout": timeout,
                "stdin": None if input is None else base64.b64encode(input).decode()}
        self.proc.stdin.write((json.dumps(case) + "\n").encode())
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"fork server died: {self.log.read().decode(errors='replace')}")
        r = json.loads(line)
        return Run(r["rc"], base64.b64decode(r["stdout"]), base64.b64decode(r["stderr"]).decode("utf-8", "replace"))

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def cli():
    """`tinygen ARGS` in a process forked from a server that has imported torch once."""
    server = ForkServer()
    yield server
    server.close()


def assert_ok(r: Run) -> None:
    __tracebackhide__ = True
    assert r.rc == 0, f"exit {r.rc}, stderr: {r.err!r}"
    assert "Traceback" not in r.err, r.err
    assert "\x1b" not in r.out and "\x1b" not in r.err, "ANSI escapes in a pipe"


def ctrl_c_during(args: list[str], after: bytes) -> tuple[int, str]:
    """Run `tinygen ARGS` drawing its live display as on a terminal (TTY_COMPATIBLE: cursor moves
    and all), press Ctrl-C once its stderr matches the regex `after`, and return the exit status
    and the stderr with its escapes stripped."""
    proc = subprocess.Popen([sys.executable, "-m", "tinygen", *args], stderr=subprocess.PIPE,
                            env=clean_env(TTY_COMPATIBLE="1", COLUMNS="100"))
    screen = b""
    while not re.search(after, screen):
        chunk = proc.stderr.read1(65536)
        assert chunk, screen.decode(errors="replace")
        screen += chunk
    proc.send_signal(signal.SIGINT)
    screen += proc.communicate(timeout=60)[1]
    return proc.returncode, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode("utf-8", "replace"))


def assert_one_line_error(r: Run, *needles: str, rc: int = 1) -> None:
    """Exit code rc, nothing on stdout, and exactly one `error: ...` line on stderr."""
    __tracebackhide__ = True
    assert r.rc == rc, f"exit {r.rc}, stderr: {r.err!r}"
    assert r.raw == b"", f"stdout should be empty on error, got {r.raw!r}"
    assert "Traceback" not in r.err, r.err
    lines = r.err.splitlines()
    assert len(lines) == 1, f"want one line on stderr, got {r.err!r}"
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"


def stats_tokens(r: Run) -> int:
    """The token count of the TINYGEN_STATS line on stderr."""
    m = re.search(r"^(\d+) tokens", r.err, re.M)
    assert m, f"no stats line in {r.err!r}"
    return int(m.group(1))
