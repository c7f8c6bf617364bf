"""The real `openai` client against the OpenAI-compatible routes: chat and legacy completions
(plain, streaming, finish_reason, usage, include_usage), /v1/models, a 400 naming each unsupported
field, system messages as context, image_url parts as frames, errors.

The fake engine counts a word as a token (`FakeEngine.ask_until_end`): its answers are 10 words,
so a max_tokens below 10 ends with "length"."""

from __future__ import annotations

import base64
import io

import httpx
import msgpack
import numpy as np
import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def streams(serve_url):
    """Two streams with identical content: answers on one must equal answers on the other."""
    png = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 77, np.uint8)).save(png, format="PNG")
    body = msgpack.packb({"seq": 0, "frames": [{"ts": 0.0, "png": png.getvalue()}]}, use_bin_type=True)
    ids = ["oai-a", "oai-b", "oai-c", "oai-d", "oai-e", "oai-f"]
    with httpx.Client(base_url=serve_url, timeout=60) as http:
        for sid in ids:
            http.post("/v1/streams", json={"id": sid})
            http.post(f"/v1/streams/{sid}/frames", content=body, headers={"content-type": "application/msgpack"})
        yield ids
        for sid in ids:
            http.delete(f"/v1/streams/{sid}")


@pytest.fixture(scope="module")
def client(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)


MESSAGES = [{"role": "system", "content": "You watch a camera."}, {"role": "user", "content": "What do you see?"}]


def test_plain_and_streaming_chat_give_the_same_answer(client, streams):
    a, b = streams[:2]
    plain = client.chat.completions.create(model=a, messages=MESSAGES, max_tokens=32)
    assert plain.object == "chat.completion" and plain.model == a
    assert plain.choices[0].message.role == "assistant" and plain.choices[0].finish_reason == "stop"
    text = plain.choices[0].message.content
    assert text.startswith("I saw 1 frames")

    chunks = list(client.chat.completions.create(model=b, messages=MESSAGES, max_tokens=32, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_stream_id_field_overrides_model(client, streams):
    out = client.chat.completions.create(
        model="any-name", messages=[{"role": "user", "content": [{"type": "text", "text": "Colour?"}]}],
        extra_body={"stream_id": streams[0]},
    )
    assert out.model == "any-name" and "frames" in out.choices[0].message.content


def test_errors_are_openai_errors(client, streams):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-stream", messages=MESSAGES)
    assert missing.value.body["code"] == "stream_not_found"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=streams[0], messages=[{"role": "system", "content": "no question"}])
    with pytest.raises(openai.UnprocessableEntityError):  # an image alone: no question
        client.chat.completions.create(
            model=streams[0],
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url()}}]}],
        )
    with pytest.raises(openai.UnprocessableEntityError, match="data URL"):
        client.chat.completions.create(model=streams[0], messages=[{"role": "user", "content": [
            {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}])


def _png(value: int = 200, size: int = 16, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (size, size), value).save(out, format="PNG")
    return out.getvalue()


def _data_url(data: bytes | None = None) -> str:
    return "data:image/png;base64," + base64.b64encode(data or _png()).decode()


QUESTION = "What do you see?"


def test_finish_reason_and_usage_follow_the_engine(client, streams):
    a, b = streams[:2]
    cut = client.chat.completions.create(model=a, messages=[{"role": "user", "content": QUESTION}], max_tokens=3)
    assert cut.choices[0].finish_reason == "length"
    assert len(cut.choices[0].message.content.split(" ")) == 3
    assert (cut.usage.prompt_tokens, cut.usage.completion_tokens, cut.usage.total_tokens) == (4, 3, 7)

    whole = client.chat.completions.create(model=b, messages=[{"role": "user", "content": QUESTION}], max_tokens=64)
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == len(whole.choices[0].message.content.split(" ")) < 64
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_include_usage_sends_a_last_usage_chunk(client, streams):
    chunks = list(client.chat.completions.create(
        model=streams[0], messages=[{"role": "user", "content": QUESTION}], max_tokens=2, stream=True,
        stream_options={"include_usage": True}))
    *answer, last = chunks
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 2)
    assert all(c.usage is None for c in answer) and answer[-1].choices[0].finish_reason == "length"
    plain = list(client.chat.completions.create(
        model=streams[0], messages=[{"role": "user", "content": QUESTION}], max_tokens=2, stream=True))
    assert all(c.choices and c.usage is None for c in plain)  # without include_usage: no usage chunk


def test_models_lists_the_streams(client, streams):
    listed = client.models.list()
    ids = [m.id for m in listed.data]
    assert set(streams) <= set(ids) and all(m.object == "model" and m.owned_by == "mosaic_ray" for m in listed.data)
    assert client.models.retrieve(streams[0]).id == streams[0]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-stream")


def test_completions_plain_and_streaming(client, streams):
    a, b = streams[2:4]
    plain = client.completions.create(model=a, prompt=QUESTION, max_tokens=4)
    assert plain.object == "text_completion" and plain.model == a
    assert plain.choices[0].finish_reason == "length" and len(plain.choices[0].text.split(" ")) == 4
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens) == (4, 4, 8)
    chunks = list(client.completions.create(model=b, prompt=[QUESTION], max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 4
    default = client.completions.create(model=a, prompt=QUESTION)  # OpenAI's default max_tokens, 16
    assert default.choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-stream", prompt=QUESTION)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=a, prompt="")


UNSUPPORTED_CHAT = [
    ("logprobs", {"logprobs": True}), ("top_logprobs", {"logprobs": True, "top_logprobs": 2}),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
    ("tool_choice", {"tool_choice": "auto"}), ("n", {"n": 2}),
    ("functions", {"functions": [{"name": "f", "parameters": {}}]}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("presence_penalty", {"presence_penalty": 0.5}), ("frequency_penalty", {"frequency_penalty": 0.5}),
    ("logit_bias", {"logit_bias": {"1": 5}}), ("made_up_field", {"extra_body": {"made_up_field": 1}}),
    ("stream_options.other", {"stream": True, "stream_options": {"include_usage": True, "other": 1}}),
]


@pytest.mark.parametrize("name, fields", UNSUPPORTED_CHAT, ids=[n for n, _ in UNSUPPORTED_CHAT])
def test_each_unsupported_chat_field_is_a_400_naming_it(client, streams, name, fields):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=streams[0], messages=[{"role": "user", "content": "q"}], **fields)
    assert refused.value.body["code"] == "unsupported_field" and name in refused.value.body["message"]


def test_unsupported_content_parts_and_completion_fields_are_400s(client, streams):
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    for messages, name in (([{"role": "user", "content": [{"type": "text", "text": "q"}, audio]}], "input_audio"),
                           ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": _data_url()}}]},
                             {"role": "user", "content": "q"}], "images of system messages")):
        with pytest.raises(openai.BadRequestError, match=name):
            client.chat.completions.create(model=streams[0], messages=messages)
    remote = [{"role": "user", "content": [{"type": "text", "text": "q"},
                                           {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    with pytest.raises(openai.BadRequestError, match="remote URLs"):
        client.chat.completions.create(model=streams[0], messages=remote)
    for fields, name in (({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of"),
                         ({"logprobs": 2}, "logprobs"), ({"n": 3}, "n"), ({"prompt": ["a", "b"]}, "prompt")):
        with pytest.raises(openai.BadRequestError, match=name):
            client.completions.create(model=streams[0], **{"prompt": "q", **fields})
    # the same fields at values that ask for nothing are fine
    ok = client.chat.completions.create(model=streams[0], messages=[{"role": "user", "content": "q"}], n=1,
                                        logprobs=False, response_format={"type": "text"}, presence_penalty=0,
                                        user="someone", max_tokens=1)
    assert ok.choices[0].finish_reason == "length"


def test_a_system_message_is_context_of_the_question(client, streams):
    """The chat answer on one stream equals the completion of "system\n\nquestion" on its twin."""
    c, d = streams[4:]
    system = "You watch a parking lot."
    chat = client.chat.completions.create(model=c, max_tokens=64, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": "Any cars?"}])
    twin = client.completions.create(model=d, prompt=f"{system}\n\nAny cars?", max_tokens=64)
    assert chat.choices[0].message.content == twin.choices[0].text
    assert chat.usage.prompt_tokens == len(f"{system}\n\nAny cars?".split())
    alone = client.completions.create(model=d, prompt="Any cars?", max_tokens=64)
    assert alone.choices[0].text != twin.choices[0].text


def test_an_image_part_becomes_a_frame_then_is_answered(client, serve_url):
    with httpx.Client(base_url=serve_url, timeout=60) as http:
        http.post("/v1/streams", json={"id": "oai-img"})
        try:
            before = http.get("/v1/streams/oai-img").json()["frames"]
            out = client.chat.completions.create(model="oai-img", max_tokens=64, messages=[{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": _data_url(), "detail": "low"}},
                {"type": "image_url", "image_url": {"url": _data_url(_png(10))}}], "ts": 3.5}])
            assert out.choices[0].message.content.startswith("I saw 2 frames")  # answered with them
            assert http.get("/v1/streams/oai-img").json()["frames"] == before + 2
            # the frames route's bounds: a frame over the pixel limit is refused, nothing appended
            big = _png(1, 4097, mode="1")
            with pytest.raises(openai.APIStatusError) as refused:
                client.chat.completions.create(model="oai-img", messages=[{"role": "user", "content": [
                    {"type": "text", "text": "and this?"}, {"type": "image_url", "image_url": {"url": _data_url(big)}}]}])
            assert refused.value.status_code in (413, 422) and "pixel" in str(refused.value.body).lower()
            assert http.get("/v1/streams/oai-img").json()["frames"] == before + 2
        finally:
            http.delete("/v1/streams/oai-img")
