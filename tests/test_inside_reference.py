"""The look-inside tools against transformers: the logit lens, activation patching and head ablation
give, at every layer, position and head, the numbers one gets by hooking transformers' own modules
(GPT-2 and Llama folders of random weights, and SmolLM2 when ../shared has it). The reference here
shares nothing with tinygen but the weights: it reads transformers' hidden states and edits its
activations with plain forward hooks, so a tool that looked at the wrong site, layer or head, or
edited nothing, would not match."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from modelfiles import transformers_llama, write_gpt2_files

from tinygen.core.checkpoint import load_model
from tinygen.inspect.activations import Target, target_token
from tinygen.inspect.heads import ablate
from tinygen.inspect.lens import logit_lens
from tinygen.inspect.patching import patch

transformers = pytest.importorskip("transformers")

SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Spot liked to run in the park with his friend"
FIRST = 3  # the token the broken prompt changes: positions before it are the same in both runs
# Logits, and probabilities as their logarithms: a random model's 50,257 probabilities are each near
# 1/50,257, where an absolute tolerance would be loose or zero.
TOLERANCE = dict(rtol=0, atol=1e-4)


# -- transformers, hooked by hand ----------------------------------------------------------------------

def hf_module(hf, kind: str, layer: int):
    """The transformers module whose input ("resid", "z") or output ("attn", "mlp") is the site."""
    base = hf.base_model
    blocks, norm = (base.h, base.ln_f) if hasattr(base, "h") else (base.layers, base.norm)
    if kind == "resid":
        return norm if layer == len(blocks) else blocks[layer]
    attn = getattr(blocks[layer], "attn", None) or blocks[layer].self_attn
    return {"attn": attn, "mlp": blocks[layer].mlp,
            "z": getattr(attn, "c_proj", None) or getattr(attn, "o_proj", None)}[kind]


def hf_run(hf, ids: list[int], edits: dict | None = None, record=()) -> tuple[torch.Tensor, dict]:
    """transformers' logits (T, V) with edits[(kind, layer)](x) -> x applied at their sites, and the
    record sites' activations. "z" is the heads' outputs flattened, (B, T, n_head * head_dim)."""
    edits, seen, handles = edits or {}, {}, []

    def change(site, x):
        x = edits[site](x) if site in edits else x
        if site in record:
            seen[site] = x
        return x

    for site in set(edits) | set(record):
        module = hf_module(hf, *site)
        if site[0] in ("resid", "z"):  # the first argument, positional or by name
            def pre(module, args, kwargs, site=site):
                if args:
                    return (change(site, args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": change(site, kwargs["hidden_states"])}
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:  # attention modules return (output, weights)
            def post(module, args, out, site=site):
                return (change(site, out[0]), *out[1:]) if isinstance(out, tuple) else change(site, out)
            handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen


def hf_lens(hf, ids: list[int], layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(layers), T, V) probabilities of final norm and unembedding on the residual stream
    entering each of the layers, and transformers' own output probabilities (T, V)."""
    n_layer = hf.config.num_hidden_layers
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    # hidden_states[n_layer] is already normed, so the last stream is the final norm's input.
    _, seen = hf_run(hf, ids, record=[("resid", n_layer)])
    streams = [*out.hidden_states[:n_layer], seen[("resid", n_layer)]]
    norm, head = hf_module(hf, "resid", n_layer), hf.get_output_embeddings()
    with torch.no_grad():
        probs = torch.stack([head(norm(streams[layer][0])).softmax(-1) for layer in layers])
    return probs, out.logits[0].softmax(-1)


def hf_head_ablation(hf, ids: list[int], heads: list[tuple[int, int]], mode: str) -> torch.Tensor:
    """Next-token probabilities with the heads' slices of c_proj's / o_proj's input zeroed or
    replaced by their mean over the prompt's positions."""
    cfg = hf.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def knock_out(layer):
        def edit(x):  # (B, T, n_head * D)
            x = x.clone()
            for h in (h for l, h in heads if l == layer):
                part = x[..., h * D:(h + 1) * D]
                x[..., h * D:(h + 1) * D] = 0 if mode == "zero" else part.mean(1, keepdim=True)
            return x
        return edit

    logits, _ = hf_run(hf, ids, edits={("z", layer): knock_out(layer) for layer, _ in heads})
    return logits[-1].softmax(-1)


# -- the models ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved transformers Llama (grouped-query attention, untied head) with a GPT-2-style
    tokenizer; its matrices scaled up so that the patched and ablated runs move the logits well
    past float error (transformers' 0.02-wide weights give near-uniform predictions)."""
    files = write_gpt2_files(tmp_path_factory.mktemp("gpt2-files"), tokenizer.ranks)
    hf = transformers_llama("llama", dict(
        hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        max_position_embeddings=64, vocab_size=len(tokenizer.ranks) + 1, rms_norm_eps=1e-6, rope_theta=1e5,
        tie_word_embeddings=False))
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder, safe_serialization=True)
    transformers.GPT2TokenizerFast.from_pretrained(str(files)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def both(request):
    """(tinygen's model, its tokenizer, transformers' model) of one folder, in float32."""
    folder = request.getfixturevalue("hf_gpt2_dir" if request.param == "gpt2" else "llama_dir")
    ours, tok, _ = load_model(folder, device="cpu", dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, tok, hf


# -- the checks ----------------------------------------------------------------------------------------

def log(p: torch.Tensor) -> torch.Tensor:
    # Below 1e-30 a probability is zero to any reader, and float32's denormals there vary by build.
    return p.clamp_min(1e-30).log()


def assert_close_log(got: torch.Tensor, want: torch.Tensor) -> None:
    __tracebackhide__ = True
    torch.testing.assert_close(log(got), log(want), **TOLERANCE)


def assert_lens_matches(ours, hf, ids: list[int], target: Target, layers: list[int]) -> None:
    """The lens against transformers at `layers`, which run from 0 (the embeddings) to n_layer."""
    n_layer = hf.config.num_hidden_layers
    assert layers[0] == 0 and layers[-1] == n_layer
    lens = logit_lens(ours, ids, [str(i) for i in ids], target, k=5)
    want, output = hf_lens(hf, ids, layers)
    assert lens.top_p.shape == (n_layer + 1, len(ids), 5)
    for layer, probs in zip(layers, want):  # probs: (T, V)
        assert_close_log(lens.top_p[layer], probs.topk(5).values)
        # The ids are those of the probabilities (compared this way, a near tie may order them either way).
        assert_close_log(probs.gather(-1, lens.top_ids[layer]), lens.top_p[layer])
        p = probs[:, target.token]
        assert_close_log(lens.target_p[layer], p)
        above = (probs > p[:, None] * (1 + 1e-4)).sum(-1) + 1  # the rank, give or take float ties
        level = (probs >= p[:, None] * (1 - 1e-4)).sum(-1)
        assert ((above <= lens.target_rank[layer]) & (lens.target_rank[layer] <= level)).all(), layer
    assert_close_log(want[-1], output)  # the last layer is the model's own output
    # The layers' predictions differ, so a lens that read the same stream at every layer would fail above.
    assert (log(want[0]) - log(want[-1])).abs().max() > 0.1


def test_the_logit_lens_is_transformers_hidden_states_read_through_its_head(both):
    ours, tok, hf = both
    ids = tok.encode(PROMPT)
    target = int(hf_run(hf, ids)[0][-1].argmax())
    assert_lens_matches(ours, hf, ids, Target(target, "target"), list(range(hf.config.num_hidden_layers + 1)))


def test_each_patched_cell_is_transformers_run_with_that_activation_swapped_in(both):
    ours, tok, hf = both
    clean = tok.encode(PROMPT)
    broken = [*clean[:FIRST], clean[FIRST] + 1, *clean[FIRST + 1:]]  # any other token breaks it
    T, n_layer = len(clean), hf.config.num_hidden_layers
    # The two tokens the break moves furthest apart, so that the grid has room between its ends.
    clean_logits, broken_logits = hf_run(hf, clean)[0], hf_run(hf, broken)[0]
    moved = clean_logits[-1] - broken_logits[-1]
    target, foil = int(moved.argmax()), int(moved.argmin())

    def score(logits):
        return float(logits[-1, target] - logits[-1, foil])

    exp = patch(ours, clean, broken, Target(target, "t"), Target(foil, "f"), kinds=("resid", "mlp", "attn"), window=1)
    torch.testing.assert_close(exp.clean, score(clean_logits), **TOLERANCE)
    torch.testing.assert_close(exp.broken, score(broken_logits), **TOLERANCE)
    span = abs(exp.clean - exp.broken)
    assert span > 0.1  # a thousand times the tolerance: room to tell a patch from none
    for kind in ("resid", "mlp", "attn"):
        _, seen = hf_run(hf, clean, record=[(kind, layer) for layer in range(n_layer)])
        want = torch.empty(n_layer, T)
        for layer in range(n_layer):
            for pos in range(T):  # positions before FIRST too: run, where tinygen fills in the broken score
                def restore(x, v=seen[(kind, layer)], pos=pos):
                    x = x.clone()
                    x[:, pos] = v[:, pos]
                    return x
                want[layer, pos] = score(hf_run(hf, broken, edits={(kind, layer): restore})[0])
        torch.testing.assert_close(exp.grids[kind].scores, want, **TOLERANCE)
        assert (want - exp.broken).abs().max() > 0.1 * span, kind  # some cell moves: a no-op patch cannot pass
    torch.testing.assert_close(exp.grids["resid"].scores[:, :FIRST], torch.full((n_layer, FIRST), exp.broken))
    # The clean embedding at the one changed position makes the whole run the clean one.
    torch.testing.assert_close(float(exp.grids["resid"].scores[0, FIRST]), exp.clean, **TOLERANCE)


def assert_ablation_matches(ours, hf, ids: list[int], heads: list[tuple[int, int]], mode: str) -> None:
    got = ablate(ours, ids, heads, mode)
    with torch.no_grad():
        assert_close_log(got.before, hf(torch.tensor([ids])).logits[0, -1].softmax(-1))
    want = hf_head_ablation(hf, ids, heads, mode)
    assert_close_log(got.after, want)
    assert (log(want) - log(got.before)).abs().max() > 0.01, (heads, mode)  # the heads matter here


def test_ablating_heads_is_transformers_with_their_slice_of_the_output_projection_cleared(both):
    ours, tok, hf = both
    ids = tok.encode(PROMPT)
    assert_ablation_matches(ours, hf, ids, [(0, 1), (1, 0)], "zero")
    assert_ablation_matches(ours, hf, ids, [(1, 1)], "mean")


@pytest.fixture(scope="module")
def smollm2():
    """tinygen's and transformers' SmolLM2, each dequantizing the Q4_1 file itself to float32."""
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} is absent")
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers' own GGUF path (from_pretrained(gguf_file=...)) needs accelerate; this is what it
    # runs. The skeleton only names the tensors (SmolLM2's 30 layers, any widths); the model runs on
    # the config transformers reads from the file.
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=30, hidden_size=8, intermediate_size=8, num_attention_heads=1, vocab_size=8))
    with pytest.MonkeyPatch.context() as mp:
        # transformers builds the same name map once per submodule, 397 times; once is enough.
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        parsed = load_gguf_checkpoint(str(SMOLLM2), return_tensors=True, model_to_load=skeleton)
    config = transformers.LlamaConfig.from_dict(parsed["config"])
    hf = transformers.LlamaForCausalLM.from_pretrained(None, config=config, state_dict=parsed["tensors"])
    # Every weight read from the file: from_pretrained would fill a missing one with random numbers.
    assert set(parsed["tensors"]) | {"lm_head.weight"} == set(hf.state_dict()) and hf.config.tie_word_embeddings
    ours, tok, _ = load_model(SMOLLM2, device="cpu", dtype=torch.float32)
    return ours, tok, hf.eval()


def test_smollm2_lens_and_ablation_match_transformers(smollm2):
    ours, tok, hf = smollm2
    ids = tok.encode("The capital of France is")
    paris = target_token(tok, " Paris")
    assert int(hf_run(hf, ids)[0][-1].argmax()) == paris.token
    assert_lens_matches(ours, hf, ids, paris, layers=[0, 10, 20, 29, 30])
    assert_ablation_matches(ours, hf, ids, [(0, 3), (20, 5)], "zero")
