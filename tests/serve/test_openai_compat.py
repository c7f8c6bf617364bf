"""The real `openai` client against /v1/chat/completions: plain, streaming, errors."""

from __future__ import annotations

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
    ids = ["oai-a", "oai-b"]
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
    a, b = streams
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
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(
            model=streams[0],
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
        )
