"""Conversation data for chat fine-tuning: converters, a loader, and the encoder.

The training format is OpenAI-style JSONL, one conversation per line:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
Converters turn the shared datasets into it: Topical-Chat (multi-turn small talk), Dolly
(single-turn instructions) and story requests built from a story corpus ("Tell me a story about
a dog who finds a ball." paired with a story that has one); `mix` joins exchanges from those
into conversations that change subject.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinygen.core.template import ROLES, Renderer
from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError
from tinygen.generate.chat import conversation_lead
from tinygen.training.data import expand_sources, read_documents, token_dtype

Conversation = list[dict]  # [{"role", "content"}, ...]


# -- loading ------------------------------------------------------------------------------------

def read_conversations(sources: list[str]) -> list[Conversation]:
    """Conversations from messages-format JSONL files; each must hold an assistant turn to learn from."""
    convs: list[Conversation] = []
    for path in expand_sources(sources):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise TinygenError(f"cannot read {path}: {e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            convs.append(_conversation(line, f"{path}:{n}"))
    if not convs:
        raise TinygenError("the chat data is empty: no conversations found")
    return convs


def _conversation(line: str, where: str) -> Conversation:
    try:
        messages = json.loads(line)["messages"]
        conv = [{"role": m["role"], "content": m["content"]} for m in messages]
    except (ValueError, KeyError, TypeError):
        raise TinygenError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}') from None
    for m in conv:
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise TinygenError(f"{where}: each message needs a role ({', '.join(ROLES)}) and text content")
    if not any(m["role"] == "assistant" for m in conv):
        raise TinygenError(f"{where}: the conversation has no assistant message to learn from")
    return conv


@dataclass
class ChatTokens:
    tokens: np.ndarray  # all conversations back to back
    mask: np.ndarray  # uint8, parallel to tokens: 1 where the loss counts (assistant text and its end marker)
    starts: np.ndarray  # int64 offset of each conversation; training windows begin at these


def encode_conversations(convs: list[Conversation], tokenizer: Tokenizer, renderer: Renderer,
                         block_size: int) -> tuple[ChatTokens, int]:
    """Encoded conversations, and how many were dropped because no assistant token falls inside
    the first block_size tokens (a training window starting there would have nothing to learn).

    Each conversation opens as a chat does (chat.conversation_lead): with <|endoftext|> under
    tinygen's template, as documents do in pretraining, so the model sees a fresh start and never
    carries one conversation into the next.
    """
    ids: list[int] = []
    mask: list[int] = []
    starts: list[int] = []
    dropped = 0
    lead = conversation_lead(renderer)
    for conv in convs:
        i, k = renderer.conversation(conv, train=True)
        if 1 not in k[: block_size - len(lead)]:
            dropped += 1
            continue
        starts.append(len(ids))
        ids += lead + i
        mask += [0] * len(lead) + k
    data = ChatTokens(np.array(ids, dtype=token_dtype(tokenizer)), np.array(mask, dtype=np.uint8),
                      np.array(starts, dtype=np.int64))
    return data, dropped


# -- converters ---------------------------------------------------------------------------------

def topical_chat(sources: list[str], turns: int = 6, max_chars: int = 600) -> Iterator[Conversation]:
    """Topical-Chat conversations, seen from both sides (either speaker plays the assistant), cut
    into pieces of at most `turns` messages so each fits a small model's context."""
    for path in _json_files(sources):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TinygenError(f"cannot read Topical-Chat file {path}: {e}") from None
        for conv in data.values():
            merged: list[tuple[str, str]] = []  # (agent, text), consecutive messages of one agent joined
            for m in conv.get("content", []):
                text = " ".join(str(m.get("message", "")).split())
                if not text:
                    continue
                if merged and merged[-1][0] == m.get("agent"):
                    merged[-1] = (merged[-1][0], merged[-1][1] + " " + text)
                else:
                    merged.append((m.get("agent"), text))
            for side in (0, 1):  # side 1 drops the opening message, so the other agent answers
                msgs = [t for _, t in merged[side:]]
                for i in range(0, len(msgs) - 1, turns):
                    piece = msgs[i : i + turns]
                    if len(piece) % 2:
                        piece = piece[:-1]
                    if piece and all(len(t) <= max_chars for t in piece):
                        yield [{"role": ("user", "assistant")[j % 2], "content": t} for j, t in enumerate(piece)]


def _json_files(sources: list[str]) -> list[Path]:
    """Topical-Chat ships .json files, which the text-file finder skips in folders."""
    files = []
    for src in sources:
        path = Path(src)
        files += sorted(path.glob("*.json")) if path.is_dir() else expand_sources([src])
    if not files:
        raise TinygenError(f"no .json files in {', '.join(sources)}")
    return files


# Instructions that lean on a passage the shared Dolly rows no longer carry.
_NEEDS_CONTEXT = re.compile(r"\b(passage|paragraph|reference|text below|text above|this text|the text|article|"
                            r"given|provided|following|above|below)\b", re.I)


def dolly(sources: list[str], max_chars: int = 800) -> Iterator[Conversation]:
    for path in expand_sources(sources):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                instruction, response = row["instruction"].strip(), row["response"].strip()
            except (ValueError, KeyError, TypeError, AttributeError):
                raise TinygenError(f'{path}:{n}: expected a Dolly row with "instruction" and "response"') from None
            if row.get("context") or _NEEDS_CONTEXT.search(instruction) or not response or len(response) > max_chars:
                continue
            yield [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]


# -- story requests -----------------------------------------------------------------------------

_NAMED = re.compile(r"\b(an? (?:[a-z]+ ){0,2}?)([a-z]+) named ([A-Z][a-z]+)")
_THERE_WAS = re.compile(r"\bthere (?:was|lived) (an? (?:[a-z]+ ){0,2})([a-z]+)(?=[.,!;]| who| that| with| in| on| at)")
_OBJECT = re.compile(r"\b(?:a|an|the|his|her|their) ([a-z]+)(?: ([a-z]+))?")
# Past-tense verbs a request can turn into "who finds a ball": the story's own action.
_VERBS = {"found": "finds", "lost": "loses", "saw": "sees", "wanted": "wants", "made": "makes", "got": "gets",
          "loved": "loves", "built": "builds", "had": "has", "met": "meets", "fixed": "fixes", "helped": "helps"}
# Words that follow an article but are not things a story is about.
_NOT_OBJECTS = set("""little big small new old red blue green yellow pink white black brown purple orange shiny pretty
beautiful happy sad good bad best other same whole first last next nice fun great tiny huge long special scary dark
bright kind soft warm cold hot day time end way moral lot rest top sky sun morning night moment idea thing things
people girl boy man woman mom dad mommy daddy friend friends very most only own biggest funny strange loud quiet
brave silly sweet yummy favorite important different""".split())


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def story_request(story: str, rng: random.Random) -> str:
    """A request this story answers, from its main character and the thing it is most about."""
    head = story[:300]
    character = short = None
    if m := _NAMED.search(head):
        adjectives, noun, name = m.groups()
        character = rng.choice([f"{adjectives}{noun} named {name}", f"{_article(noun)} {noun} named {name}",
                                f"{_article(noun)} {noun}"])
        short = f"{_article(noun)} {noun}"
    elif m := _THERE_WAS.search(head):
        adjectives, noun = m.groups()
        character = rng.choice([f"{adjectives}{noun}", f"{_article(noun)} {noun}"])
        short = f"{_article(noun)} {noun}"
    # The word after an article, or after its adjective: "the ball", "a big ball".
    things = (second if first in _NOT_OBJECTS else first for first, second in _OBJECT.findall(story.lower()))
    counts = Counter(w for w in things if len(w) > 2 and w not in _NOT_OBJECTS
                     and (short is None or w != short.split()[-1]))
    thing = next((w for w, c in counts.most_common(3) if c >= 2), None)
    action = None
    if thing:
        if v := re.search(rf"\b({'|'.join(_VERBS)}) (?:a|an|the|his|her|their) (?:[a-z]+ )?{thing}\b", story.lower()):
            action = f"{_VERBS[v.group(1)]} {_article(thing)} {thing}"
    topics = []
    if short and action:
        topics.append(f"{short} who {action}")
    if character and thing:
        topics.append(f"{character} and {_article(thing)} {thing}")
    if character:
        topics.append(character)
    if thing:
        topics.append(f"{_article(thing)} {thing}")
    if not topics:
        return rng.choice(["Tell me a story.", "Can you tell me a story?", "Please tell me a short story."])
    topic = topics[0] if rng.random() < 0.5 else rng.choice(topics)
    return rng.choice([
        "Tell me a story about {}.", "Can you tell me a story about {}?", "Please tell me a story about {}.",
        "Write a short story about {}.", "I want a story about {}.", "tell me a story about {}",
        "Could you tell me a short story about {}?",
    ]).format(topic)


def story_requests(sources: list[str], max_chars: int = 1800, seed: int = 0) -> Iterator[Conversation]:
    rng = random.Random(seed)
    for story in read_documents(expand_sources(sources)):
        if len(story) <= max_chars:
            yield [{"role": "user", "content": story_request(story, rng)}, {"role": "assistant", "content": story}]


def mixed(sources: list[str], seed: int = 0, max_chars: int = 2000) -> Iterator[Conversation]:
    """Conversations that change subject: the first exchange of two or three conversations drawn
    from different files, joined. Trained only on whole conversations, a model keeps to the
    subject it opened with (small talk, then a story request answered with more small talk); these
    teach it to answer the newest message."""
    pools = []
    for path in expand_sources(sources):
        pool = [c[:2] for c in read_conversations([str(path)]) if [m["role"] for m in c[:2]] == ["user", "assistant"]]
        if pool:
            pools.append(pool)
    if len(pools) < 2:
        raise TinygenError("mix needs two or more files of conversations (the output of the other kinds)")
    rng = random.Random(seed)
    for _ in range(sum(map(len, pools)) // 4):
        picked = rng.sample(range(len(pools)), min(len(pools), rng.choice((2, 2, 3))))
        conv = [m for p in picked for m in rng.choice(pools[p])]
        if sum(len(m["content"]) for m in conv) <= max_chars:
            yield conv


CONVERTERS = {"topical-chat": topical_chat, "dolly": dolly, "stories": story_requests, "mix": mixed}
SEEDED = {"stories", "mix"}  # the converters whose output depends on --seed


def to_jsonl(convs: Iterable[Conversation]) -> Iterator[str]:
    for conv in convs:
        yield json.dumps({"messages": conv}, ensure_ascii=False) + "\n"
