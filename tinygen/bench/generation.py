"""Generation speed for `tinygen bench`: batch-1 decode and prefill (against transformers' on the
same weights, and llama.cpp's on the same GGUF), batched generation (against transformers'
generate()), and a chat's time to first token with its KV cache kept or not. The sides of each
figure are timed in turn (measure.py)."""

from __future__ import annotations

import statistics
import time

import torch

from tinygen.bench.measure import (
    Clock,
    decode_rates,
    interleave,
    interleave_all,
    paired_ratio,
    sync_for,
    timer,
)


def decode_section(net, hf, prompt: list[int], new_tokens: int, repeats: int, dev, say, decoder=None,
                   llama=None) -> dict:
    """Batch-1 prefill and decode: ours, transformers' (hf, or None) and llama.cpp's on the same
    GGUF (llama: a llamacpp.LlamaCpp, or None), timed in turn."""
    sync = sync_for(dev)
    nobody = (None, None)
    sides = [_our_side(net, prompt, new_tokens, decoder, sync),
             _transformers_side(hf, prompt, new_tokens, dev, sync) if hf is not None else nobody,
             _llama_cpp_side(llama, prompt, new_tokens, sync) if llama is not None else nobody]
    others = [name for name, side in (("transformers'", hf), ("llama.cpp's", llama)) if side is not None]
    turns = f", ours and {' and '.join(others)} in turn" if others else ""
    say(f"batch-1 prefill{turns}")
    prefill, hf_prefill, llama_prefill = interleave_all([prefill for prefill, _ in sides], repeats)
    say(f"batch-1 decode{turns}")
    runs, hf_runs, llama_runs = interleave_all([decode for _, decode in sides], repeats)
    section = {"prompt_tokens": len(prompt), "new_tokens": new_tokens,
               "tinygen": _figures(len(prompt), prefill, runs)}
    if llama is not None:
        section["llama_cpp"] = {**_figures(len(prompt), llama_prefill, llama_runs), "version": llama.version,
                                **_against(prefill, runs, llama_prefill, llama_runs, new_tokens)}
    if hf is not None:
        section["transformers"] = _figures(len(prompt), hf_prefill, hf_runs)
        section.update(_against(prefill, runs, hf_prefill, hf_runs, new_tokens))
    return section


def _our_side(net, prompt: list[int], new_tokens: int, decoder, sync):
    """Our prefill, as a timer, and our decode, returning (first-token time, rate) and its tokens."""
    from tinygen.generate import engine
    from tinygen.generate.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)

    def decode():
        start = time.perf_counter()
        stamps, out = [], []
        for tok in engine.stream(net, prompt, greedy, new_tokens, decoder=decoder):
            stamps.append(time.perf_counter())
            out.append(tok)
        return decode_rates(stamps, start, new_tokens), out

    # The cache the engine sizes for this request (a StaticDecoder brings its own, grown to fit it).
    if decoder is not None:
        decoder.reserve(len(prompt) + new_tokens)
    prefill = timer(lambda: engine.prefill(net, [prompt], decoder and decoder.cache,
                                           None if decoder else len(prompt) + new_tokens), sync)
    return prefill, decode


def _transformers_side(hf, prompt: list[int], new_tokens: int, dev, sync):
    """transformers' prefill and decode on the same weights, as _our_side times ours."""
    from tinygen.bench.reference import hf_greedy

    ids = torch.tensor([prompt], device=dev)
    # logits_to_keep=1: as generate() prefills, and as our prefill does.
    prefill = timer(lambda: hf(ids, use_cache=True, logits_to_keep=1), sync)

    def decode():
        clock = Clock()
        start = time.perf_counter()
        out = hf_greedy(hf, prompt, new_tokens, streamer=clock)
        return decode_rates(clock.stamps[1:], start, new_tokens), out  # stamp 0 is the prompt

    return prefill, decode


def _llama_cpp_side(llama, prompt: list[int], new_tokens: int, sync):
    """llama.cpp's prefill and decode on the same GGUF, as _our_side times ours."""
    prefill = timer(lambda: llama.prefill(prompt), sync)

    def decode():
        stamps = []
        start = time.perf_counter()
        out = llama.greedy(prompt, new_tokens, stamps)
        return decode_rates(stamps, start, new_tokens), out

    return prefill, decode


def _figures(prompt_tokens: int, prefill_s: list[float], decodes: list) -> dict:
    """One side's medians: prefill rate, time to first token and decode rate."""
    return {"prefill_tok_s": prompt_tokens / statistics.median(prefill_s),
            "first_token_ms": 1000 * statistics.median(r[0][0] for r in decodes),
            "decode_tok_s": statistics.median(r[0][1] for r in decodes)}


def _against(prefill: list[float], runs: list, their_prefill: list[float], their_runs: list, new_tokens: int) -> dict:
    """Ours against another side: each ratio is ours over theirs as a speed (so a time is divided
    the other way round), with the range of its per-repeat values, and how far the two greedy
    outputs agree. Same weights, same greedy rule: the first tokens must agree, or the comparison
    is void."""
    pairs = {"decode": paired_ratio([r[0][1] for r in runs], [r[0][1] for r in their_runs]),
             "prefill": paired_ratio(their_prefill, prefill),
             "first_token": paired_ratio([r[0][0] for r in their_runs], [r[0][0] for r in runs])}
    return {"ratio": {k: ratio for k, (ratio, _) in pairs.items()},
            "spread": {k: spread for k, (_, spread) in pairs.items()},
            "greedy_agreement": f"{_agreement(runs[0][1], their_runs[0][1])}/{new_tokens} tokens"}


def _agreement(ours: list[int], theirs: list[int]) -> int:
    """How many tokens two greedy runs share before they first differ."""
    agree = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        agree += 1
    return agree


def batch_section(net, hf, prompt_tokens: int, new_tokens: int, batch_sizes, repeats: int, dev, say) -> list[dict]:
    """Generation throughput, prefill included, for batches of distinct prompts of one length."""
    from tinygen.generate import engine
    from tinygen.generate.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    sync = sync_for(dev)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for b in batch_sizes:
        say(f"batch {b}: {b} prompts x {new_tokens} new tokens")
        prompts = torch.randint(0, net.config.vocab_size, (b, prompt_tokens), generator=gen)
        ours = timer(lambda: engine.generate_batch(net, prompts.tolist(), greedy, new_tokens), sync)
        ref = None
        if hf is not None:
            ids = prompts.to(dev)
            ref = timer(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                            eos_token_id=None), sync)
        times, ref_times = interleave(ours, ref, repeats)
        row = {"batch": b, "tinygen_tok_s": b * new_tokens / statistics.median(times)}
        if hf is not None:
            row["transformers_tok_s"] = b * new_tokens / statistics.median(ref_times)
            row["ratio"], row["spread"] = paired_ratio(ref_times, times)
        rows.append(row)
    return rows


def chat_section(net, turns: int, repeats: int, dev, say) -> dict:
    """Time to first token of each turn of a conversation: with the KV cache kept from turn to turn
    (context.Context, as `tinygen chat` runs), and with every turn prefilling the whole history again
    (how chat ran before, and what the kept cache is measured against). Random message ids and
    greedy replies; each turn's prompt is the last one, its reply and a new message, so the history
    grows by a message and a reply a turn. Both ways must give the same replies."""
    from tinygen.generate import engine
    from tinygen.generate.context import Context
    from tinygen.generate.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    sync = sync_for(dev)
    # Messages and replies of equal length, as long as five turns of them fit the context (64 at most).
    length = max(1, min(64, net.config.block_size // (2 * turns)))
    gen = torch.Generator().manual_seed(2)
    messages = torch.randint(0, net.config.vocab_size, (turns, length), generator=gen).tolist()

    def conversation(keep: bool):
        def run():
            context = Context() if keep else None
            history, firsts = [], []
            for message in messages:
                prompt = history + message
                start = time.perf_counter()
                reply = []
                for token in engine.stream(net, prompt, greedy, length, context=context):
                    if not reply:
                        sync()
                        firsts.append(time.perf_counter() - start)
                    reply.append(token)
                history = prompt + reply
            return firsts, history
        return run

    say(f"chat: {turns} turns of {length}-token messages and replies, the cache kept and not, in turn")
    kept, fresh = interleave(conversation(True), conversation(False), repeats)

    def per_turn(runs) -> list[float]:
        return [1000 * statistics.median(r[0][t] for r in runs) for t in range(turns)]

    ours, ref = per_turn(kept), per_turn(fresh)
    ratio, spread = paired_ratio([r[0][-1] for r in fresh], [r[0][-1] for r in kept])
    return {"turns": turns, "message_tokens": length, "reply_tokens": length,
            "tinygen": {"first_token_ms": ours}, "reprefill": {"first_token_ms": ref},
            "last_over_first": ours[-1] / ours[0], "ratio": ratio, "spread": spread,
            "same_replies": kept[0][1] == fresh[0][1]}
