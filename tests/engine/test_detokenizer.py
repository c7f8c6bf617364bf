"""Streamed answers never carry half a character and add up to the whole decode (the tiny preset's
byte-level tokenizer splits emoji, umlauts and CJK across tokens, as SmolLM2's does)."""

import pytest

from mosaic_ray.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer
from mosaic_ray.engine.interface import AskRequest
from mosaic_ray.engine.question import QuestionRun

TEXTS = ["The bunny says 😀 and then jumps away.", "Der Bär läuft über die Straße.", "兔子的名字是鲍勃。", "plain ascii"]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_are_whole_characters_and_add_up(tiny_adapter, text):
    tok = tiny_adapter.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    pieces = [d.push(i) for i in ids] + [d.finish()]
    assert "".join(pieces) == text == tok.decode(ids)
    assert not any(REPLACEMENT in p for p in pieces)
    assert sum(1 for p in pieces if p) > 1  # it streams, it does not wait for the end


def test_a_character_cut_by_the_end_comes_out_once_at_finish(tiny_adapter):
    tok = tiny_adapter.tokenizer
    ids = tok.encode("ok 😀", add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    streamed = "".join(d.push(i) for i in ids[:-1])
    assert streamed == "ok " and d.finish() == tok.decode(ids[:-1])[len("ok "):]


def test_question_run_streams_the_answer_and_stops_at_a_stop_string(tiny_adapter):
    tok = tiny_adapter.tokenizer
    ids = tok.encode("Der Bär läuft über die Straße. Danach", add_special_tokens=False)
    run = QuestionRun(None, AskRequest("q", max_tokens=len(ids) + 5, stop=[". D"]), [], [], None, set(tiny_adapter.eos_token_ids))
    deltas = []
    for i in ids:
        deltas.append(run.take_token(i, tok))
        if run.phase == "closing":
            break
    assert "".join(deltas) == run.emitted == "Der Bär läuft über die Straße"
    assert run.finish_reason == "stop" and not any(REPLACEMENT in x for x in deltas)


def test_question_run_flushes_at_the_token_limit(tiny_adapter):
    tok = tiny_adapter.tokenizer
    ids = tok.encode("兔子的名字", add_special_tokens=False)
    run = QuestionRun(None, AskRequest("q", max_tokens=len(ids)), [], [], None, set(tiny_adapter.eos_token_ids))
    out = "".join(run.take_token(i, tok) for i in ids)
    assert out == "兔子的名字" and run.finish_reason == "length"
