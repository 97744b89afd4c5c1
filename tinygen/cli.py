"""The `tinygen` command line. Commands are thin: parse, call the library, print.

torch is imported inside the commands that need it, so `tinygen --help`, `tokenize` and `info`
start fast. TinygenError, usage errors, a closed pipe and Ctrl-C all end in `main` as one line
on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tinygen import __version__, ui
from tinygen.errors import TinygenError

RICH_HELP = ui.is_tty() and not os.environ.get("NO_COLOR")
app = typer.Typer(
    name="tinygen",
    help="Train, run and look inside compact GPT-style language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Boxed, coloured help on a terminal; plain text in a pipe, which also skips importing Rich's
    # Markdown renderer (a third of the start-up time of `tinygen --help`).
    rich_markup_mode="rich" if RICH_HELP else None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by several commands, defined once.
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model: a tinygen .safetensors file or a Hugging Face GPT-2 folder. "
                 "Default: $TINYGEN_MODEL, else the bundled model.", show_default=False),
]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="Weights for generation: auto (bf16 on CUDA, float32 elsewhere), "
                                       "float32 or bfloat16. On a CPU, bfloat16 decodes faster but prefills slower.")]
QuantOpt = Annotated[Optional[str], typer.Option("--quantize", help="int8: int8 weight-only linear layers (CPU), "
                                                "a quarter of float32's bytes per token; the loss it costs is in "
                                                "the README.", show_default=False)]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the decode step and replay it as a CUDA "
                                           "graph: several times faster at batch 1 on a GPU. The first run "
                                           "compiles (about a minute); later runs load it from the cache.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate per sample.")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 is greedy.")]
TopKOpt = Annotated[int, typer.Option("--top-k", "-k", help="Keep the k most likely tokens; 0 is off.")]
TopPOpt = Annotated[float, typer.Option("--top-p", "-p", help="Keep the smallest set of tokens with this much probability; 1 is off.")]
MinPOpt = Annotated[float, typer.Option("--min-p", help="Drop tokens below this fraction of the top token's probability; 0 is off.")]
RepPenOpt = Annotated[float, typer.Option("--repetition-penalty", help="Above 1 discourages tokens already present; 1 is off.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed: same seed and flags give the same output on the same device.")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this text appears (repeatable).")]


def _version(value: bool) -> None:
    if value:
        print(f"tinygen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """Train, run and look inside compact GPT-style language models."""


def _read_stdin() -> str:
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TinygenError(f"stdin is not valid UTF-8 (byte {e.start}); convert it first, e.g. with iconv") from e


def _text_arg(text: Optional[str]) -> str:
    """TEXT from the argument, or from stdin when it is `-` or omitted and stdin is piped."""
    if text is not None and text != "-":
        return text
    if text == "-" or not sys.stdin.isatty():
        return _read_stdin().rstrip("\r\n")
    return ""


def _load(model: Optional[str], device: str, dtype: str = "auto", quantize: Optional[str] = None):
    from tinygen.checkpoint import load_model
    from tinygen.engine import inference_dtype, resolve_device

    dev = resolve_device(device)
    net, tokenizer, info = load_model(model, device=dev, dtype=inference_dtype(dev, dtype))
    if quantize is not None:
        from tinygen.quantize import quantize as quantize_model

        quantize_model(net, quantize)
    return net, tokenizer, info


def _decoder(net, compile: bool):
    """The compiled batch-1 decode step, compiled now so that its cost shows up front, or None."""
    if not compile:
        return None
    from tinygen.compiled import StaticDecoder, cache_dir

    if net.device.type == "cpu":
        ui.warn("--compile pays off on a GPU; on a CPU the plain decode step is as fast")
    decoder = StaticDecoder(net)
    ui.note(f"compiling the decode step (cached in {cache_dir()})…")
    ui.note(f"ready in {decoder.warm_up():.1f} s")
    return decoder


@app.command()
def sample(
    prompt: Annotated[Optional[str], typer.Argument(help="Prompt text; `-` or piped stdin reads it from stdin. "
                                                    "Empty starts a fresh document.", show_default=False)] = None,
    model: ModelOpt = None,
    max_new_tokens: MaxNewOpt = 200,
    temperature: TempOpt = 0.8,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    min_p: MinPOpt = 0.0,
    repetition_penalty: RepPenOpt = 1.0,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    num_samples: Annotated[int, typer.Option(help="How many samples of the prompt.")] = 1,
    echo: Annotated[Optional[bool], typer.Option("--echo/--no-echo", help="Print the prompt before the completion. "
                                                  "Default: on a terminal only.", show_default=False)] = None,
    input: Annotated[Optional[str], typer.Option("--input", "-i", help="Batch mode: a file of prompts, one per line "
                                                 "(`-` for stdin). Prints one completion per line, newlines folded.")] = None,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Batch mode with JSON lines in and out: reads "
                                        '{"prompt": ..., optional sampling fields}, writes {"prompt", "completion", '
                                        '"tokens", "finish_reason"}. Reads --input or stdin.')] = False,
    batch_size: Annotated[int, typer.Option(help="Prompts generated together in batch mode.")] = 16,
    explain: Annotated[bool, typer.Option("--explain", help="Show each step's likeliest next tokens: the model's "
                                          "probabilities beside those left after the sampling flags, and the token "
                                          "drawn. With --jsonl: one JSON object per step.")] = False,
    show_probs: Annotated[int, typer.Option("--show-probs", help="Like --explain, with this many candidates per step "
                                            "(--explain shows 5).", show_default=False)] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantOpt = None,
    compile: CompileOpt = False,
) -> None:
    """Generate text from a prompt, streaming it to stdout."""
    from tinygen.sampling import SamplingParams
    from tinygen.textgen import Completion, Request, TextGenerator

    if max_new_tokens < 1:
        raise TinygenError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if num_samples < 1 or batch_size < 1:
        raise TinygenError("--num-samples and --batch-size must be at least 1")
    if show_probs < 0:
        raise TinygenError(f"--show-probs must be at least 1, got {show_probs}")
    explain_k = show_probs or (5 if explain else 0)
    if explain_k and (input is not None or num_samples > 1):
        raise TinygenError("--explain follows one sample of one prompt; drop --input/--num-samples")
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    base = Request("", params, max_new_tokens, tuple(stop or ()), seed)
    if input is not None or (jsonl and not explain_k):
        requests = _batch_requests(input, jsonl, base)
        gen = TextGenerator(*_load(model, device, dtype, quantize)[:2])
        _run_batch(gen, requests, batch_size, jsonl)
        return
    text = _text_arg(prompt)
    net, tokenizer, _ = _load(model, device, dtype, quantize)
    gen = TextGenerator(net, tokenizer, compiled=_decoder(net, compile))
    n_prompt = len(gen.encode_prompt(text))
    if n_prompt > gen.block_size:
        ui.warn(f"prompt has {n_prompt} tokens, more than the model's context of {gen.block_size}; "
                f"keeping the last {gen.block_size}")
    if explain_k:
        _explain(gen, Request(text, params, max_new_tokens, base.stop, seed), explain_k, jsonl)
        return
    sink = ui.TextSink()
    show_prompt = sink.tty if echo is None else echo
    for i in range(num_samples):
        if i:
            sink.end()
        if show_prompt:
            sink.prompt(text)
        result = Completion()
        # One generator per sample run keeps a seed reproducible; later samples get seed + i.
        request = Request(text, params, max_new_tokens, base.stop, None if seed is None else seed + i)
        for piece in gen.stream(request, result):
            sink.text(piece)
        sink.end()
        if sink.tty or os.environ.get("TINYGEN_STATS"):
            ui.stats_line(result.tokens, result.seconds, result.first_token_seconds)


def _explain(gen, request, k: int, jsonl: bool) -> None:
    from tinygen import views
    from tinygen.textgen import Completion

    label = gen.tokenizer.label
    if jsonl:
        for step in gen.explain(request, k):
            ui.write(json.dumps(step.to_dict(label), ensure_ascii=False) + "\n")
        return
    console = ui.out()
    width = views.next_token_header(console, views.flags_summary(request.params))
    result = Completion()
    for step in gen.explain(request, k, result):
        views.next_token_step(console, step, label, width)
    sink = ui.TextSink()  # the text the steps made, as plain sampling shows it
    sink.prompt(request.prompt)
    sink.text(result.text)
    sink.end()


def _batch_requests(path: Optional[str], jsonl: bool, base):
    from dataclasses import replace

    from tinygen.sampling import SamplingParams
    from tinygen.textgen import Request

    if path in (None, "-"):
        lines = _read_stdin().splitlines()
    else:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise TinygenError(f"no such input file: {path}") from None
        except UnicodeDecodeError:
            raise TinygenError(f"{path} is not valid UTF-8") from None
    requests = []
    fields = set(SamplingParams.__dataclass_fields__)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            requests.append(replace(base, prompt=line))
            continue
        try:
            obj = json.loads(line)
            prompt = obj.pop("prompt")
        except (ValueError, KeyError, AttributeError, TypeError):
            raise TinygenError(f"line {n} of the input is not a JSON object with a \"prompt\"") from None
        if not isinstance(prompt, str):
            raise TinygenError(f"line {n}: \"prompt\" must be a string")
        unknown = set(obj) - fields - {"max_new_tokens", "stop", "seed"}
        if unknown:
            raise TinygenError(f"line {n}: unknown fields {', '.join(sorted(unknown))}")
        try:
            params = replace(base.params, **{k: _number(v, k) for k, v in obj.items() if k in fields})
        except TinygenError as e:
            raise TinygenError(f"line {n}: {e}") from None
        stop = obj.get("stop", base.stop)
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop):
            raise TinygenError(f"line {n}: \"stop\" must be a string or a list of strings")
        max_new = obj.get("max_new_tokens", base.max_new_tokens)
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise TinygenError(f"line {n}: \"max_new_tokens\" must be a positive integer")
        seed = obj.get("seed", base.seed)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TinygenError(f"line {n}: \"seed\" must be an integer")
        requests.append(Request(prompt, params, max_new, tuple(stop), seed))
    if not requests:
        raise TinygenError("batch mode got no prompts")
    return requests


def _number(value, name: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TinygenError(f"\"{name}\" must be a number, got {json.dumps(value)}")
    return int(value) if name == "top_k" else float(value)


def _run_batch(gen, requests, batch_size: int, jsonl: bool) -> None:
    for index, result in gen.batch(requests, batch_size):
        if jsonl:
            line = json.dumps({"prompt": requests[index].prompt, "completion": result.text,
                               "tokens": result.tokens, "finish_reason": result.finish_reason}, ensure_ascii=False)
        else:
            line = result.text.replace("\r", " ").replace("\n", " ")
        ui.write(line + "\n")


@app.command()
def tokenize(
    text: Annotated[Optional[str], typer.Argument(help="Text to tokenize (or ids with --decode); `-` or piped stdin "
                                                  "reads stdin.", show_default=False)] = None,
    model: ModelOpt = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Use this tokenizer instead: a checkpoint, a GPT-2 "
                                                     "model folder, or a folder with vocab.json + merges.txt.")] = None,
    ids: Annotated[bool, typer.Option("--ids", help="Print only the ids, space-separated.")] = False,
    decode: Annotated[bool, typer.Option("--decode", help="Turn ids (space or comma separated) back into text.")] = False,
    count: Annotated[bool, typer.Option("--count", help="Print only the number of tokens.")] = False,
    probs: Annotated[bool, typer.Option("--probs", help="Colour each token by the model's probability of it, with "
                                        "its loss, and the text's perplexity (runs the model).")] = False,
    train: Annotated[Optional[list[str]], typer.Option("--train", help="Train a new BPE tokenizer on these files, "
                                                       "folders or globs (repeatable) and write it to --out.")] = None,
    vocab_size: Annotated[int, typer.Option(help="With --train: vocabulary size, special tokens included.")] = 4096,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="With --train: the tokenizer file to write (.json).")] = None,
    separator: Annotated[str, typer.Option(help="With --train: text that separates documents.")] = "<|endoftext|>",
) -> None:
    """Show how text splits into tokens, with ids and a count; or train a tokenizer."""
    from tinygen.checkpoint import load_tokenizer, load_tokenizer_source

    if train:
        _train_tokenizer(train, vocab_size, out, separator)
        return
    if probs and not decode:
        if tokenizer:
            raise TinygenError("--probs scores with the model's own tokenizer; drop --tokenizer")
        _token_probs(model, _text_arg(text))
        return
    tok = load_tokenizer_source(tokenizer) if tokenizer else load_tokenizer(model)
    text = _text_arg(text)
    if decode:
        try:
            token_ids = [int(t) for t in text.replace(",", " ").split()]
        except ValueError:
            raise TinygenError("--decode expects token ids: integers separated by spaces or commas") from None
        bad = [t for t in token_ids if not 0 <= t < tok.n_vocab]
        if bad:
            raise TinygenError(f"token id {bad[0]} is outside this vocabulary (0..{tok.n_vocab - 1})")
        ui.write(tok.decode(token_ids) + "\n")
        return
    token_ids = tok.encode(text)
    if count:
        ui.write(f"{len(token_ids)}\n")
    elif ids:
        ui.write(" ".join(map(str, token_ids)) + "\n")
    else:
        ui.show_tokens(tok, token_ids, text)


def _token_probs(model: Optional[str], text: str) -> None:
    from tinygen import views
    from tinygen.explain import surprisal

    net, tok, _ = _load(model, "auto")
    ids = tok.encode(text)
    if not ids:
        raise TinygenError("no text to score")
    s = surprisal(net, ids, tok.eot_id)
    labels = [tok.label(i) for i in ids]
    summary = (f"{len(ids)} tokens · mean loss {s.mean_loss:.3f} nats/token over {s.scored} · "
               f"perplexity {s.perplexity:.2f}")
    if not ui.is_tty():
        # One token per line, as plain tokenize writes in a pipe: id, text, probability, loss in nats.
        ui.write("".join(f"{i}\t{json.dumps(label, ensure_ascii=False)}\t{p:.6g}\t{loss:.4f}\n"
                         for i, label, p, loss in zip(ids, labels, s.probs, s.losses)))
        ui.err().print(summary)
        return
    console = ui.out()
    views.surprisal(console, labels, s.probs, s.context)
    console.print(summary, style="bold")


def _train_tokenizer(sources: list[str], vocab_size: int, out: Optional[Path], separator: str) -> None:
    from tinygen import atomic
    from tinygen import data as data_lib
    from tinygen.tokenizer import Tokenizer

    if out is None:
        raise TinygenError("--train needs --out FILE for the tokenizer")
    docs = data_lib.read_documents(data_lib.expand_sources(sources), separator)
    tok = Tokenizer.train(docs, vocab_size)
    atomic.write_bytes(out, json.dumps(tok.to_dict()).encode())
    ui.err().print(f"wrote {out}: {tok.n_vocab:,} tokens ({len(tok.ranks):,} merged + {len(tok.special)} special), "
                   f"trained on {len(docs):,} documents")


@app.command()
def info(
    model: Annotated[Optional[str], typer.Argument(help="Model file or GPT-2 folder (default: as for --model).",
                                                   show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show a model's config, size, tokenizer and provenance (reads the header only)."""
    from tinygen.checkpoint import load_tokenizer, read_info

    meta = read_info(model)
    tok = load_tokenizer(info=meta)
    cfg = meta.config
    summary = {
        "path": str(meta.path),
        "kind": meta.kind,
        "format_version": meta.format_version,
        "config": json.loads(cfg.to_json()),
        "parameters": meta.n_params,
        "file_size": meta.file_size,
        "dtypes": list(meta.dtypes),
        "tokenizer": {"name": tok.name, "n_vocab": tok.n_vocab, "special_tokens": tok.special},
        "chat_template": tok.chat_template,
        "provenance": meta.provenance,
    }
    if as_json:
        ui.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        return
    rows = [
        ("path", str(meta.path)),
        ("kind", meta.kind + (f" (format v{meta.format_version})" if meta.format_version else "")),
        ("architecture", cfg.arch),
        ("shape", f"n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd} "
                  f"block_size={cfg.block_size} vocab_size={cfg.vocab_size}"),
        ("parameters", f"{ui.human_count(meta.n_params)} ({meta.n_params:,})"),
        ("file size", ui.human_bytes(meta.file_size)),
        ("dtype", ", ".join(meta.dtypes)),
        ("tokenizer", f"{tok.name}, {tok.n_vocab:,} tokens, special: {' '.join(tok.special)}"),
        ("chat", "chat-tuned: " + " ".join(f"{r}={p}…{s}" for r, (p, s) in tok.chat_template["roles"].items())
         if tok.chat_template else "not chat-tuned (`tinygen chat` uses a plain User:/Assistant: transcript)"),
    ]
    rows += [(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in meta.provenance.items()]
    ui.info_table(rows, title=f"tinygen model: {meta.path.name}")


@app.command()
def chat(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model to chat with. Default: $TINYGEN_MODEL, "
                                                 "else the bundled chat model. A model that was never chat-tuned "
                                                 "gets a plain User:/Assistant: transcript.", show_default=False)] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt.", show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Answer this one message and exit.",
                                                  show_default=False)] = None,
    jsonl: Annotated[bool, typer.Option("--jsonl", help='Replies as {"role", "content"} JSON lines; input lines may '
                                        "be JSON messages too (so they can hold newlines).")] = False,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TempOpt = 0.7,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 0.9,
    min_p: MinPOpt = 0.0,
    repetition_penalty: RepPenOpt = 1.1,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantOpt = None,
    compile: CompileOpt = False,
) -> None:
    """Chat with a model: a REPL on a terminal; in a pipe, each input line is one message."""
    from tinygen.chat import ChatSession
    from tinygen.checkpoint import DEFAULT_CHAT_MODEL, resolve_model_path
    from tinygen.repl import Repl, banner
    from tinygen.sampling import SamplingParams

    if max_new_tokens < 1:
        raise TinygenError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    path = resolve_model_path(model, DEFAULT_CHAT_MODEL)
    net, tokenizer, _ = _load(str(path), device, dtype, quantize)
    session = ChatSession(net, tokenizer, params, max_tokens=max_new_tokens, seed=seed, system=system,
                          compiled=_decoder(net, compile))
    repl = Repl(session, jsonl=jsonl)
    interactive = prompt is None and sys.stdin.isatty()
    if not session.template.tuned and not interactive:
        ui.warn(f"{path.name} is not chat-tuned: using a plain User:/Assistant: transcript")
    if prompt is not None:
        repl.turn(prompt, show_stats=ui.is_tty())
    elif interactive:
        repl.interactive(banner(path.name, net.num_params(), session.template.tuned))
    else:
        repl.scripted(sys.stdin)


@app.command()
def attention(
    text: Annotated[Optional[str], typer.Argument(help="Text to look at; `-` or piped stdin reads stdin.",
                                                  show_default=False)] = None,
    model: ModelOpt = None,
    token: Annotated[Optional[str], typer.Option("--token", "-w", help="The query: a word of the text (its last "
                                                 "token, if it has several). Default: the last token.",
                                                 show_default=False)] = None,
    position: Annotated[Optional[int], typer.Option(help="The query by token index (negative counts from the end).",
                                                    show_default=False)] = None,
    layer: Annotated[Optional[int], typer.Option("--layer", "-l", help="Layer, from 0 (negative counts from the "
                                                 "end). Default: the last.", show_default=False)] = None,
    head: Annotated[Optional[int], typer.Option("--head", help="One head, from 0. Default: the mean of the layer's "
                                                "heads.", show_default=False)] = None,
    all_heads: Annotated[bool, typer.Option("--all", help="Every layer x head at once, as a grid of small bars.")] = False,
    matrix: Annotated[bool, typer.Option("--matrix", help="The whole token x token map of one layer/head as a "
                                         "heatmap.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Every weight (layers x heads x tokens x tokens) and the "
                                          "tokens, as JSON.")] = False,
    html: Annotated[Optional[Path], typer.Option("--html", help="Write a standalone explorer page (one file, works "
                                                 "offline) to open in a browser.", show_default=False)] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Show which earlier tokens a token attends to, in each layer and head."""
    from tinygen import views
    from tinygen.attention import attention_map, find_word, query_at

    if token is not None and position is not None:
        raise TinygenError("give --token or --position, not both")
    if sum((all_heads, matrix, as_json, html is not None)) > 1:
        raise TinygenError("pick one of --all, --matrix, --json and --html")
    if all_heads and (layer is not None or head is not None):
        raise TinygenError("--all shows every layer and head; drop --layer/--head")
    text = _text_arg(text)
    net, tok, meta = _load(model, device)
    amap = attention_map(net, tok, tok.encode(text))
    if amap.dropped:
        ui.warn(f"the text has {len(amap.ids) + amap.dropped} tokens, more than the model's context; "
                f"looking at the last {len(amap.ids)}")
    query = find_word(amap, tok, token) if token is not None else query_at(amap, position)
    if query.note:
        ui.note(query.note)
    layer_i = amap.layer_index(layer)
    head_i = None if head is None else amap.head_index(head)
    if as_json:
        ui.write(json.dumps(amap.to_dict(meta.path.name, text, query.position), ensure_ascii=False) + "\n")
        return
    if html is not None:
        from tinygen.explorer import write_html

        # The page opens on the view the flags name; every layer and head is in it either way.
        page = {**amap.to_dict(meta.path.name, text, query.position, decimals=None), "layer": layer_i, "head": head_i}
        write_html(html, page)
        ui.note(f"wrote {html}: open it in a browser")
        return
    q = query.position
    where = f"layer {layer_i} of 0–{amap.n_layer - 1}, " + (f"head {head_i}" if head_i is not None
                                                        else f"mean of its {amap.n_head} heads")
    console = ui.out()
    if all_heads:
        views.attention_grid(console, amap.labels, amap.weights, q,
                             f"attention from {views.visible(amap.labels[q])!r} (token {q}), every layer and head")
    elif matrix:
        views.attention_matrix(console, amap.labels, amap.matrix(layer_i, head_i), f"attention map, {where}")
    else:
        views.attention_bars(console, amap.labels, amap.matrix(layer_i, head_i)[q], q,
                             f"attention from {views.visible(amap.labels[q])!r} (token {q}), {where}")


@app.command()
def embed(
    words: Annotated[list[str], typer.Argument(help="Words to look up; with --analogy, three: A B C for A - B + C.",
                                               show_default=False)],
    model: ModelOpt = None,
    analogy: Annotated[bool, typer.Option("--analogy", help="Nearest tokens to A - B + C (king man woman: "
                                          "king - man + woman).")] = False,
    top: Annotated[int, typer.Option("--top", "-k", help="How many neighbours to list.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Nearest tokens to a word in the model's token embedding space, by cosine similarity."""
    from tinygen import embedding, views

    if top < 1:
        raise TinygenError(f"--top must be at least 1, got {top}")
    if analogy and len(words) != 3:
        raise TinygenError(f"--analogy takes three words, A B C for A - B + C; got {len(words)}")
    net, tok, _ = _load(model, "cpu")
    if analogy:
        vector, parts = embedding.analogy(net, tok, *words)
        queries = [(f"{words[0]} - {words[1]} + {words[2]}", vector, parts)]
    else:
        parts = [embedding.word_vector(net, tok, w) for w in words]
        queries = [(w.word, w.vector, [w]) for w in parts]
    results = []
    for name, vector, used in queries:
        for w in used:
            if w.note:
                ui.note(w.note)
        found = embedding.nearest(net, tok, vector, top, exclude=[i for w in used for i in w.ids])
        results.append({"query": name, "tokens": {w.word: [tok.label(i) for i in w.ids] for w in used},
                        "nearest": [{"token": i, "text": tok.label(i), "cosine": round(c, 6)} for i, c in found]})
    if as_json:
        ui.write(json.dumps(results if len(results) > 1 else results[0], indent=2, ensure_ascii=False) + "\n")
        return
    console = ui.out()
    for n, r in enumerate(results):
        if n:
            console.print()
        views.neighbours(console, f"nearest to {r['query']} (cosine similarity of token embeddings)",
                         [(x["text"], x["cosine"]) for x in r["nearest"]])


def _parse_duration(text: Optional[str]) -> Optional[float]:
    """Seconds from `90`, `90s`, `45m`, `2h` or `1h30m`."""
    if text is None:
        return None
    import re

    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not parts or not any(parts.groups()) or not text.strip():
        raise TinygenError(f"--time expects a duration like 90s, 45m, 2h or 1h30m, got {text!r}")
    h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
    seconds = 3600 * h + 60 * m + sec
    if seconds <= 0:
        raise TinygenError("--time must be positive")
    return seconds


@app.command()
def train(
    data: Annotated[list[str], typer.Argument(help="Training text: files, folders or globs; plain text or JSONL "
                                              "with a \"text\" field. With --chat: conversations.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (.safetensors).", show_default=False)],
    preset: Annotated[Optional[str], typer.Option(help="Model size: tiny (~1M), mini, small (~15M), medium, "
                                                  "gpt2 (124M). Default tiny.", show_default=False)] = None,
    n_layer: Annotated[Optional[int], typer.Option(help="Override the preset's number of blocks.")] = None,
    n_head: Annotated[Optional[int], typer.Option(help="Override the preset's attention heads.")] = None,
    n_embd: Annotated[Optional[int], typer.Option(help="Override the preset's width.")] = None,
    block_size: Annotated[Optional[int], typer.Option(help="Override the preset's context length.")] = None,
    arch: Annotated[str, typer.Option(help="rope (default: rotary, RMSNorm, SwiGLU) or gpt2.")] = "rope",
    dropout: Annotated[float, typer.Option(help="Dropout; 0.1-0.2 helps on small data.")] = 0.0,
    vocab_size: Annotated[int, typer.Option(help="Size of the BPE vocabulary to train, special tokens included.")] = 4096,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Reuse this checkpoint's (or GPT-2 folder's) "
                                                     "tokenizer instead of training one.")] = None,
    init: Annotated[Optional[str], typer.Option(help="Start from this checkpoint's weights (fine-tuning).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run saved at --out.")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Chat fine-tuning of --init: DATA is messages-format JSONL "
                                       "(see `tinygen chat-data`); only the assistant's tokens are learned.")] = False,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    tokens: Annotated[Optional[int], typer.Option("--tokens", help="Stop after this many training tokens.")] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time", help="Stop after this long: 90s, 45m, 2h.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch on each process.")] = 16,
    batch_tokens: Annotated[Optional[int], typer.Option(help="Tokens per optimizer step; gradient accumulation "
                                                        "makes up the difference.")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = 100,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm to this; 0 is off.")] = 1.0,
    eval_every: Annotated[int, typer.Option(help="Evaluate, sample and save every this many steps.")] = 250,
    eval_tokens: Annotated[int, typer.Option(help="Validation tokens scored per evaluation.")] = 200_000,
    val_fraction: Annotated[float, typer.Option(help="Share of documents held out for validation.")] = 0.05,
    separator: Annotated[str, typer.Option(help="Text that separates documents in plain-text files.")] = "<|endoftext|>",
    seed: Annotated[int, typer.Option(help="Seed for initialisation, batches and dropout.")] = 1337,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (GPU).")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Train a model (and its tokenizer) on your own text."""
    from tinygen.engine import resolve_device
    from tinygen.progress import TrainDisplay
    from tinygen.recipe import prepare
    from tinygen.train import TrainSettings, init_distributed, shutdown_distributed
    from tinygen.train import train as train_loop

    stops = dict(max_steps=max_steps, max_tokens=tokens, max_time=_parse_duration(time_limit))
    settings = None  # a resumed run takes its settings from its state file
    default_steps = not resume and not any(stops.values())
    if not resume:
        if default_steps:
            stops["max_steps"] = 1000
        settings = TrainSettings(**stops, batch_size=batch_size, batch_tokens=batch_tokens, lr=lr,
                                 warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip,
                                 eval_every=eval_every, eval_tokens=eval_tokens, seed=seed, compile=compile)
    dev = resolve_device(device)
    dist = init_distributed(dev)
    if dev.type == "cuda" and dist.world > 1:
        import torch

        dev = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(dev)
    console = ui.err()
    try:
        run = prepare(data, out, settings, stops, dist=dist, preset=preset,
                      shape=dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size), arch=arch,
                      dropout=dropout, vocab_size=vocab_size, tokenizer_from=tokenizer, init=init, resume=resume,
                      separator=separator, val_fraction=val_fraction, chat=chat)
        if default_steps and dist.master:
            console.print("[dim]no --max-steps, --tokens or --time given: training for 1000 steps[/dim]")
        stop = _StopFlag()
        events = train_loop(run.model, run.tokenizer, run.train_data, run.val_data, out, run.settings, device=dev,
                            dist=dist, resume=resume, val_bytes=run.val_bytes, provenance=run.provenance,
                            chat=run.chat, should_stop=stop)
        if not dist.master:
            for _ in events:
                pass
            return
        with stop.installed(), TrainDisplay(console, run.tokenizer, out) as display:
            for ev in events:
                display.handle(ev)
        display.finish()
    finally:
        shutdown_distributed(dist)


class _StopFlag:
    """Ctrl-C or SIGTERM asks the training loop to save and stop at the next step boundary."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def installed(self):
        import contextlib
        import signal

        @contextlib.contextmanager
        def handlers():
            def on_signal(signum, frame):
                if self.requested:  # a second Ctrl-C means now
                    raise KeyboardInterrupt
                self.requested = True
                ui.warn("stopping: saving a checkpoint at the end of this step (Ctrl-C again to abort)")

            old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

        return handlers()


@app.command("chat-data")
def chat_data(
    kind: Annotated[str, typer.Argument(help="topical-chat (Topical-Chat .json files), dolly (Dolly JSONL), "
                                        "stories (story text: \"Tell me a story about ...\" requests) or mix "
                                        "(conversations that change subject, joined from files of the others).",
                                        show_default=False)],
    sources: Annotated[list[str], typer.Argument(help="Files or folders to convert.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write here instead of stdout.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the wording of story requests and the choices of mix.")] = 0,
) -> None:
    """Convert conversation datasets into the JSONL that `tinygen train --chat` reads."""
    from tinygen import atomic
    from tinygen.chatdata import CONVERTERS, SEEDED, to_jsonl

    if kind not in CONVERTERS:
        raise TinygenError(f"unknown kind {kind!r}; choose from {', '.join(CONVERTERS)}")
    convs = CONVERTERS[kind](sources, **({"seed": seed} if kind in SEEDED else {}))
    if out is None:
        for line in to_jsonl(convs):
            ui.write(line)
        return
    lines = list(to_jsonl(convs))
    atomic.write_bytes(out, "".join(lines).encode())
    ui.err().print(f"wrote {len(lines)} conversations to {out}")


@app.command("eval")
def eval_cmd(
    files: Annotated[list[str], typer.Argument(help="Text files to score (documents split on --separator).",
                                               show_default=False)],
    model: ModelOpt = None,
    separator: Annotated[str, typer.Option(help="Text that separates documents.")] = "<|endoftext|>",
    stride: Annotated[Optional[int], typer.Option(help="Sliding-window stride in tokens (default: half the context).")] = None,
    val_split: Annotated[Optional[float], typer.Option(help="Score only the documents that `tinygen train` with this "
                                                       "--val-fraction (and --seed) held out of the same FILES.")] = None,
    seed: Annotated[int, typer.Option(help="With --val-split: the training run's --seed.")] = 1337,
    record: Annotated[bool, typer.Option("--record", help="Also store the scores in the model's provenance "
                                         "(shown by `tinygen info`).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    device: DeviceOpt = "auto",
    quantize: QuantOpt = None,
) -> None:
    """Score a model on text: mean loss, perplexity and bits per byte."""
    from tinygen import data as data_lib
    from tinygen.evaluate import score_tokens

    docs = data_lib.read_documents(data_lib.expand_sources(files), separator)
    if val_split is not None:
        _, docs = data_lib.split_documents(docs, val_split, seed)
        if not docs:
            raise TinygenError("--val-split left no documents to score")
    if record and quantize is not None:
        raise TinygenError("--record stores the model's own scores; drop --quantize to record")
    net, tok, meta = _load(model, device, quantize=quantize)
    if stride is not None and not 0 < stride <= net.config.block_size:
        raise TinygenError(f"--stride must be in 1..{net.config.block_size}")
    tokens = data_lib.encode_documents(docs, tok)
    score = score_tokens(net, tokens, stride=stride, n_bytes=sum(len(d.encode()) for d in docs))
    result = {"model": str(meta.path), "quantize": quantize, "documents": len(docs), **score.as_dict()}
    if record:
        from tinygen.checkpoint import update_provenance

        label = "val" if val_split is not None else "eval"
        update_provenance(meta.path, {f"{label}_loss": score.loss, f"{label}_bpb": score.bits_per_byte,
                                      f"{label}_data": " ".join(files) + (f" (val split {val_split}, seed {seed})"
                                                                          if val_split is not None else "")})
    if as_json:
        ui.write(json.dumps(result, indent=2) + "\n")
        return
    rows = [("model", str(meta.path) + (f" (--quantize {quantize})" if quantize else "")),
            ("documents", f"{len(docs):,}"), ("tokens", f"{score.tokens:,}"),
            ("loss", f"{score.loss:.4f} nats/token"), ("perplexity", f"{score.perplexity:.2f}"),
            ("bits per byte", f"{score.bits_per_byte:.4f}")]
    ui.info_table(rows, title="evaluation")


@app.command()
def bench(
    model: ModelOpt = None,
    shape: Annotated[Optional[str], typer.Option(help="Benchmark a training preset's shape with random weights instead "
                                                 "of a model: tiny, mini, small (~15M), medium or gpt2 (124M).")] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Comma-separated sections to run: decode (batch-1 "
                                                "decode, prefill, bandwidth), batch (batched generation), train. "
                                                "Default: all.", show_default=False)] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length.")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Tokens to decode per batch-1 measurement.")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed repeats of batch-1 decode and prefill; the median is reported.")] = 3,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes for batched generation, comma-separated.")] = "1,8,32,64",
    batch_new_tokens: Annotated[int, typer.Option(help="Tokens generated per row in batched generation.")] = 32,
    steps: Annotated[int, typer.Option(help="Training steps to time (the first two are warm-up).")] = 6,
    train_batch: Annotated[int, typer.Option(help="Sequences per training step.")] = 8,
    compare: Annotated[bool, typer.Option("--compare", help="Also run transformers' generate() on the same weights, "
                                          "and a bare PyTorch training loop, and report the ratios (needs transformers).")] = False,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: tinygen's choice).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantOpt = None,
    compile: Annotated[bool, typer.Option("--compile", help="Compile the batch-1 decode step (CUDA graphs on a GPU), "
                                          "and both training loops.")] = False,
) -> None:
    """Measure generation and training speed against references run in the same process."""
    from tinygen import bench as bench_lib

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise TinygenError(f"--batch-sizes takes integers separated by commas, got {batch_sizes!r}") from None
    sections = tuple(s.strip() for s in only.split(",")) if only else bench_lib.SECTIONS
    result = bench_lib.run(model=model, shape=shape, sections=sections, prompt_tokens=prompt_tokens,
                           new_tokens=new_tokens, repeats=repeats, batch_sizes=sizes, batch_new_tokens=batch_new_tokens,
                           steps=steps, train_batch=train_batch, compare=compare, threads=threads, device=device,
                           dtype=dtype, quantize=quantize, compile=compile, progress=None if as_json else ui.err())
    if as_json:
        ui.write(json.dumps(result, indent=2) + "\n")
    else:
        bench_lib.print_table(result, ui.out())


def _click_exceptions():
    """Typer >= 0.29 vendors click as typer._click; older Typer uses the click package."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main() -> None:
    exc = _click_exceptions()
    try:
        rc = app(standalone_mode=False)
    except TinygenError as e:
        ui.error(str(e))
        rc = 1
    except exc.UsageError as e:
        if isinstance(e, getattr(exc, "NoArgsIsHelpError", ())):
            if not RICH_HELP:  # Typer's Rich path has shown the help already; click's plain one leaves it to us
                ui.write(e.ctx.get_help() + "\n")
            rc = 0
        else:
            command = e.ctx.command_path if e.ctx else "tinygen"
            ui.error(f"{e.format_message()} (see `{command} --help`)")
            rc = 2
    except (typer.Abort, KeyboardInterrupt):
        rc = 130
    except ui.OutputClosed:
        # The reader went away (`| head`): stop quietly, and keep Python's exit flush from failing too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 0
    sys.exit(rc if isinstance(rc, int) else 0)
