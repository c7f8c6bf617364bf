"""The one validation layer of every path (issue 20, items 2, 5, 6, 7): HTTP query, OpenAI chat
and WebSocket events take the same types, and every question reaches the engine through
`engine_ask`. No Ray here: the schemas and the check alone."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from mosaic_ray.bounds import MIN_TOP_P
from mosaic_ray.engine.interface import AskRequest, InvalidInputError
from mosaic_ray.serve.errors import QuestionTooLongError
from mosaic_ray.serve.openai_compat import ChatCompletionRequest
from mosaic_ray.serve.realtime_events import EventError, parse_event
from mosaic_ray.serve.schemas import CreateStreamRequest, QueryIn, engine_ask

MAX_CHARS = 100
TINY = [(1e-39, 1e-46), (5e-324, 5e-324), (1e-5, 1e-45)]


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="cam", messages=[{"role": "user", "content": fields.pop("q", "q")}], **fields)


def _ws_params(**response) -> dict:
    ev = parse_event(json.dumps({"type": "response.create", "response": {"question": "q", **response}}))
    return {k: v for k, v in ev.response.model_dump().items() if v is not None and k != "instructions"}


@pytest.mark.parametrize("temperature,top_p", TINY)
def test_a_tiny_temperature_is_greedy_and_a_tiny_top_p_is_the_floor_on_every_path(temperature, top_p):
    for params in (QueryIn(question="q", temperature=temperature, top_p=top_p).ask_params(),
                   _chat(temperature=temperature, top_p=top_p).ask_params(),
                   _ws_params(temperature=temperature, top_p=top_p)):
        out = engine_ask(params, MAX_CHARS)
        assert out["temperature"] == 0.0 and out["top_p"] == MIN_TOP_P, params
        AskRequest(**out)  # the engine takes it


def test_session_defaults_use_the_same_floors():
    ev = parse_event(json.dumps({"type": "session.update", "session": {"temperature": 1e-39, "top_p": 1e-46}}))
    assert ev.session.temperature == 0.0 and ev.session.top_p == MIN_TOP_P


def test_a_question_over_the_configured_bound_is_413_on_every_path():
    long = "a" * (MAX_CHARS + 1)
    for params in (QueryIn(question=long).ask_params(), _chat(q=long).ask_params(), _ws_params(question=long)):
        with pytest.raises(QuestionTooLongError) as info:
            engine_ask(params, MAX_CHARS)
        assert info.value.status == 413 and info.value.code == "question_too_long"
    assert engine_ask({"question": "a" * MAX_CHARS}, MAX_CHARS)["question"] == "a" * MAX_CHARS


@pytest.mark.parametrize("bad", [{"seed": 2**64}, {"seed": -1}, {"temperature": float("nan")}, {"question": "a\x00"},
                                 {"since": 1e300}, {"stop": ["\x1b[2J"]}, {"max_tokens": 10**9}])
def test_engine_ask_refuses_what_the_schemas_refuse(bad):
    with pytest.raises(InvalidInputError):
        engine_ask({"question": "q", **bad}, MAX_CHARS)


WS_BAD = [
    # (name, event): each refused by the event's schema, as HTTP refuses its twin
    ("seq beyond 64 bits", {"type": "input_video_frame.append", "seq": 2**64, "ts": 1, "image": "AAAA"}),
    ("seq beyond 63 bits", {"type": "input_video_frame.append", "seq": 2**63, "ts": 1, "image": "AAAA"}),
    ("ts of 1e300", {"type": "input_video_frame.append", "ts": 1e300, "image": "AAAA"}),
    ("ts of a system item beyond 30 years", {"type": "conversation.item.create", "ts": 2e9,
                                              "item": {"role": "system", "content": [{"text": "x"}]}}),
    ("seed beyond 64 bits", {"type": "response.create", "response": {"question": "q", "seed": 2**64}}),
    ("session seed beyond 63 bits", {"type": "session.update", "session": {"seed": 2**63}}),
    ("negative seed", {"type": "session.update", "session": {"seed": -1}}),
    ("nul in a question", {"type": "response.create", "response": {"question": "a\x00b"}}),
    ("nul in an item", {"type": "conversation.item.create", "item": {"content": [{"text": "a\x00b"}]}}),
    ("escape in a stop", {"type": "session.update", "session": {"stop": ["\x1b[2J"]}}),
    ("huge question", {"type": "response.create", "response": {"question": "a" * ((1 << 20) + 1)}}),
    ("until beyond 30 years", {"type": "response.create", "response": {"until": 1e300}}),
    ("newline in a stream id", {"type": "session.update", "session": {"stream_id": "cam-1\n"}}),
]


@pytest.mark.parametrize("name,event", WS_BAD, ids=[w[0] for w in WS_BAD])
def test_websocket_events_are_validated_as_http(name, event):
    with pytest.raises(EventError) as info:
        parse_event(json.dumps(event))
    assert info.value.code == "malformed_event"


@pytest.mark.parametrize("sid", ["cam-1\n", "cam\r", "a\x00"])
def test_a_stream_id_with_a_control_character_is_refused_by_every_schema(sid):
    with pytest.raises(ValidationError):
        CreateStreamRequest(id=sid)
    with pytest.raises(ValidationError):
        _chat(stream_id=sid)
