"""`tinygen info`: a model's config, size, tokenizer and provenance, from its header alone."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.filesize import decimal

from tinygen.cli import ui
from tinygen.cli.options import MODEL_KINDS, ModelOpt
from tinygen.errors import TinygenError

if TYPE_CHECKING:
    from tinygen.core.checkpoint import ModelInfo
    from tinygen.core.tokenizer import Tokenizer


def info(
    ctx: typer.Context,
    path: Annotated[Optional[str], typer.Argument(metavar="MODEL", help="The same as --model: "
                                                  f"{MODEL_KINDS}.", show_default=False)] = None,
    model: ModelOpt = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Machine-readable output, at full "
                                          "precision.")] = False,
) -> None:
    """Show a model's config, size, tokenizer and provenance (reads the header only)."""
    from tinygen.core.checkpoint import load_tokenizer, read_info

    if path is not None and model is not None:
        if ctx.get_parameter_source("model").name != "ENVIRONMENT":
            raise TinygenError("name the model once: as an argument or with --model, not both")
        model = None  # a model named on the command line outranks $TINYGEN_MODEL
    meta = read_info(path or model)
    tokenizer = load_tokenizer(info=meta)
    if as_json:
        ui.write(json.dumps(meta.summary(tokenizer), indent=2, ensure_ascii=False) + "\n")
        return
    ui.info_table(rows(meta, tokenizer), title=f"tinygen model: {meta.path.name}")


def rows(meta: ModelInfo, tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """What `info` shows people, as (label, text) rows: sizes in units, numbers rounded, and the
    provenance indented under its own heading (its keys may repeat the labels above)."""
    from tinygen.core.template import template_for

    cfg = meta.config
    template = template_for(tokenizer)
    shape = (f"n_layer={cfg.n_layer} n_head={cfg.n_head}" + (f" n_kv_head={cfg.kv_heads}" if cfg.n_kv_head else "")
             + f" n_embd={cfg.n_embd} mlp={cfg.mlp_hidden} vocab_size={cfg.vocab_size}")
    switches = [s for s, on in (("untied head", not cfg.tie_embeddings), ("q/k/v biases", cfg.qkv_bias),
                                (f"rope theta {cfg.rope_theta:g}", cfg.arch == "rope"),
                                ("llama3 rope scaling", cfg.rope_scaling is not None), ("qk-norm", cfg.qk_norm),
                                ("relu² MLP", cfg.mlp == "relu2"),
                                (f"logit soft-cap {cfg.logit_softcap:g}" if cfg.logit_softcap else "", cfg.logit_softcap),
                                (f"value embeddings ×{cfg.value_embeds}", cfg.value_embeds),
                                (f"sliding window {cfg.sliding_window or 0:,} in {len(cfg.sliding_layers)} of "
                                 f"{cfg.n_layer} layers", cfg.sliding_layers),
                                (f"local rope theta {cfg.rope_local_theta:g}" if cfg.rope_local_theta else "",
                                 cfg.rope_local_theta is not None),
                                ("post-norms", cfg.post_norms), ("embedding scale", cfg.embed_scale),
                                ("GeGLU MLP", cfg.mlp == "geglu"),
                                (f"attention scalar {cfg.attn_scalar:g}" if cfg.attn_scalar else "", cfg.attn_scalar))
                if on]
    if template.name != "tinygen":  # a model's own Jinja template
        chat = f"its own template: {template.name}" + (f"; default system prompt: {template.default_system}"
                                                       if template.default_system else "")
    elif template.tuned:
        chat = "chat-tuned: " + " ".join(f"{r}={p}…{s}" for r, (p, s) in template.roles.items())
    else:
        chat = "not chat-tuned (`tinygen chat` uses a plain User:/Assistant: transcript)"
    shown = [
        ("path", str(meta.path)),
        ("kind", meta.kind + (f" (format v{meta.format_version})" if meta.format_version else "")),
        ("architecture", ", ".join([cfg.arch, *switches])),
        ("shape", shape),
        ("context", f"{cfg.block_size:,} tokens"),
        ("parameters", f"{ui.human_count(meta.n_params)} ({meta.n_params:,})"),
        ("file size", decimal(meta.file_size)),
        ("dtype", types_by_kind(meta.tensors) if len(meta.dtypes) > 1 else ", ".join(meta.dtypes)),
        ("tokenizer", f"{tokenizer.kind} ({tokenizer.name}), {tokenizer.n_vocab:,} tokens, special: "
                      f"{' '.join(list(tokenizer.special)[:12])}{' …' if len(tokenizer.special) > 12 else ''}"),
        ("chat", chat),
    ]
    if meta.kind == "gguf":
        shown.append(("runs", runs(meta)))
    shown += [("note", note) for note in meta.notes]
    if meta.provenance:
        shown += [("provenance", "")] + [(f"  {k}", readable(v)) for k, v in meta.provenance.items()]
    return shown


def types_by_kind(tensors: dict) -> str:
    """Each storage type and the kinds of tensor held in it (q_proj, embed_tokens, norms, ...),
    as a quantised file mixes them: `Q4_1: q_proj k_proj … · Q8_0: embed_tokens · F32: norms`."""
    import re

    kinds: dict[str, dict[str, None]] = {}
    for name, (_, dtype) in tensors.items():
        kind = re.sub(r"^.*\.(?:layers|h)\.\d+\.", "", name).removesuffix(".weight").removesuffix(".bias")
        kind = "norms" if "norm" in kind or kind.startswith("ln_") else kind.rsplit(".", 1)[-1]
        kinds.setdefault(dtype, {})[kind] = None
    return " · ".join(f"{dtype}: {' '.join(k)}" for dtype, k in kinds.items())


def runs(meta: ModelInfo) -> str:
    """How each of a GGUF's tensor types runs by default on a CPU (`--dtype float32` or `bfloat16`,
    or a GPU, dequantizes every one)."""
    from tinygen.formats.gguf_model import how_types_run

    return " · ".join(f"{kind}: {', '.join(hows)}" for kind, hows in how_types_run(meta).items()) + \
        " (on a CPU; --dtype float32 or bfloat16, or a GPU, dequantizes them all)"


def readable(value) -> str:
    """A provenance value for people: floats to 4 significant digits, whole numbers with thousands
    separators, text as it is, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return json.dumps(value, ensure_ascii=False)
