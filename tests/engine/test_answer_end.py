"""Why an answer ended and what it cost (`AnswerEnd`), as `StreamEngine.ask_until_end` reports it
after the deltas: the same finish reason as the synchronous answer, an end token counted as a
completion token, the prompt counted as the question's own tokens."""

import asyncio

import pytest

from engine_fixtures import frames, make_engine
from mosaic_ray.engine.interface import AnswerEnd, AskRequest, Engine
from mosaic_ray.engine.question import QuestionRun


def _twins(tiny_adapter):
    engines = [make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30) for _ in range(2)]
    for e in engines:
        e.open_stream("s")
        e.append_frames("s", frames(4, seed=3), [float(i) for i in range(4)])
    return engines


def _ask_until_end(engine, request):
    async def collect():
        return [x async for x in engine.ask_until_end("s", request)]

    return asyncio.run(collect())


@pytest.mark.parametrize("max_tokens", [1, 3])
def test_the_end_follows_the_deltas_and_matches_the_answer(tiny_adapter, max_tokens):
    engine, twin = _twins(tiny_adapter)
    request = AskRequest("What is there?", max_tokens=max_tokens)
    *deltas, end = _ask_until_end(engine, request)
    want = twin.answer("s", request)
    assert isinstance(end, AnswerEnd) and all(isinstance(d, str) for d in deltas)
    assert "".join(deltas) == want.text and end.finish_reason == want.finish_reason
    prompt, _ = tiny_adapter.question_text(request.question)
    assert end.prompt_tokens == len(tiny_adapter.tokenizer.encode(prompt, add_special_tokens=False))
    if end.finish_reason == "length":
        assert end.completion_tokens == max_tokens == len(want.token_ids)
    else:  # an end token came first: it counts, it is not text
        assert end.completion_tokens == len(want.token_ids) + 1 <= max_tokens
    assert end.as_dict()["usage"]["total_tokens"] == end.prompt_tokens + end.completion_tokens


def test_an_end_token_is_stop_and_counted(tiny_adapter):
    tok, eos = tiny_adapter.tokenizer, set(tiny_adapter.eos_token_ids)
    run = QuestionRun(None, AskRequest("q", max_tokens=8), [1, 2], [], None, eos)
    for i in tok.encode("hi", add_special_tokens=False) + [next(iter(eos))]:
        run.take_token(i, tok)
    end = run.end()
    assert end.finish_reason == "stop" and end.completion_tokens == len(run.generated) and end.prompt_tokens == 2


def test_an_engine_without_counts_ends_with_stop_and_no_usage():
    class Plain(Engine):  # only `ask`: the interface's default ask_until_end
        async def ask(self, stream_id, request):
            yield "a"

    for name in list(Plain.__abstractmethods__):
        setattr(Plain, name, lambda *a, **k: None)
    Plain.__abstractmethods__ = frozenset()

    async def collect():
        return [x async for x in Plain().ask_until_end("s", AskRequest("q"))]

    assert asyncio.run(collect()) == ["a", AnswerEnd()]
    assert AnswerEnd().as_dict() == {"finish_reason": "stop", "usage": None}
    with pytest.raises(ValueError):
        AnswerEnd("abort")
