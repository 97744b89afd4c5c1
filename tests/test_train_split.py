"""Validation that holds something out: a corpus of few documents gives up the end of its text
(and the tokenizer never sees it), the chart promises only what it draws, and `tinygen eval`
scores in float32 with progress on a terminal only."""

import json
import math

import numpy as np
import torch

from tinygen.cli.progress import loss_chart
from tinygen.core.checkpoint import load_model
from tinygen.core.evaluate import score_tokens
from tinygen.training import data as data_lib
from tinygen.training.distributed import Dist
from tinygen.training.recipe import Recipe, prepare

from conftest import STORY_LINES, assert_ok
from test_tty import run_in_pty

SECRET = "Zyzzyva quokka"


def test_few_documents_hold_out_the_end_of_the_text():
    text = "\n".join(f"Line {i}: " + STORY_LINES[i % len(STORY_LINES)] for i in range(200))
    split = data_lib.split_for_validation([text], 0.1, seed=1)
    assert split.method == "tail" and len(split.train) == len(split.val) == 1
    head, tail = split.train[0], split.val[0]
    assert text.startswith(head) and text.endswith(tail) and tail.startswith("Line ")  # cut at a line's start
    assert len(head) + len(tail) + 1 == len(text) and 0.09 < len(tail) / len(text) < 0.12
    assert split.describe(0.1, 1) == "the last 10% of the text"
    # Enough documents: whole ones, as before; none asked for: none.
    docs = [f"doc {i}" for i in range(40)]
    assert data_lib.split_for_validation(docs, 0.1, seed=3).val == data_lib.split_documents(docs, 0.1, seed=3)[1]
    assert data_lib.split_for_validation([text], 0, seed=1).val == []
    # Two documents at 5%: the held-out text comes from the end of the last one only.
    tail_only = data_lib.split_for_validation(["short first document", text], 0.05, seed=1)
    assert tail_only.train[0] == "short first document" and text.endswith(tail_only.val[0])


def test_one_long_text_trains_its_tokenizer_without_the_held_out_text(tmp_path):
    corpus = tmp_path / "play.txt"
    lines = [STORY_LINES[i % len(STORY_LINES)] for i in range(180)] + [f"{SECRET} {SECRET}."] * 20
    corpus.write_text("\n".join(lines))
    run = prepare(Recipe([str(corpus)], tmp_path / "m.safetensors", vocab_size=400, block_size=32, n_layer=1,
                         n_head=2, n_embd=32, val_fraction=0.1, train={"max_steps": 1}), dist=Dist())
    assert len(run.val_data) > 0 and run.provenance["val_split"] == "the last 10% of the text"
    assert any("too few documents to hold out whole ones" in note for note in run.notes)
    # The held-out lines are all SECRET: a tokenizer that had seen them would have merged it into 3 tokens.
    assert len(run.tokenizer.encode(" " + SECRET)) > 6
    assert SECRET in run.tokenizer.decode(run.val_data.tolist()) and SECRET not in run.tokenizer.decode(run.train_data.tolist())


def test_the_loss_chart_promises_only_what_it_draws():
    train = [(1, 3.0), (2, 2.5), (3, 2.2)]
    without = loss_chart(train, []).plain
    assert "◆" not in without and without.startswith("loss (· train)\n")
    with_val = loss_chart(train, [(3, 2.4)]).plain
    assert with_val.startswith("loss (· train, ◆ val)\n") and with_val.count("◆") == 2


def test_score_tokens_reports_progress(model_path, tokenizer):
    model = load_model(model_path)[0]
    tokens = np.array(tokenizer.encode(" ".join(STORY_LINES * 8)), dtype=np.int64)
    seen = []
    score = score_tokens(model, tokens, stride=16, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert len(seen) > 2 and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (len(tokens) - 1, len(tokens) - 1) == (score.tokens, score.tokens)


def test_eval_scores_in_float32_unless_asked(cli, model_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(STORY_LINES))
    bf16 = tmp_path / "bf16.safetensors"
    model, tok, _ = load_model(model_path)
    from tinygen.core.checkpoint import save_checkpoint

    save_checkpoint(bf16, model.to(torch.bfloat16), tok)  # weights stored in bf16, as a GPU run might keep them
    r = cli("eval", "-m", bf16, text, "--json", "--device", "cpu")
    assert_ok(r)
    assert r.err == ""  # nothing but the result in a pipe
    reference = score_tokens(load_model(bf16, dtype=torch.float32)[0],
                             data_lib.encode_documents(data_lib.read_documents([text]), tok))
    assert math.isclose(json.loads(r.out)["loss"], reference.loss, rel_tol=1e-6)
    in_bf16 = json.loads(cli("eval", "-m", bf16, text, "--json", "--device", "cpu", "--dtype", "bfloat16").out)
    assert in_bf16["loss"] != json.loads(r.out)["loss"]


def test_eval_shows_progress_on_a_terminal(model_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(STORY_LINES * 6))
    screen = run_in_pty(["eval", "-m", str(model_path), str(text), "--device", "cpu"])
    assert "scoring" in screen and "perplexity" in screen
