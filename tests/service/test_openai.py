"""The OpenAI-compatible API, driven by the `openai` Python client against the real server."""

from __future__ import annotations

import uuid

import openai
import pytest
from test_generate import MESSAGES, NEW_TOKENS, write_varied_merged_model

from furina.checkpoint import load_tokenizer


@pytest.fixture(scope="module")
def model_name(server) -> str:
    name = f"openai-{uuid.uuid4().hex[:8]}"
    write_varied_merged_model(server.data_dir, name)
    return name


@pytest.fixture(scope="module")
def api(server) -> openai.OpenAI:
    # No API key is configured on the session server; the client still needs a string.
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as api:
        yield api


def greedy(client, model_name: str, **body) -> dict:
    response = client.post(
        "/generate", json={"model": model_name, "max_new_tokens": NEW_TOKENS, **body}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_chat_completion_matches_generate(api, client, model_name):
    expected = greedy(client, model_name, messages=MESSAGES)

    completion = api.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0
    )

    assert completion.object == "chat.completion"
    assert completion.model == model_name
    assert len(completion.choices) == 1
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == expected["text"]
    assert completion.choices[0].finish_reason == expected["finish_reason"]
    assert completion.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert completion.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert completion.usage.total_tokens == expected["usage"]["total_tokens"]


def test_chat_completion_stream_with_usage(api, client, model_name):
    expected = greedy(client, model_name, messages=MESSAGES)

    stream = api.chat.completions.create(
        model=model_name,
        messages=MESSAGES,
        max_tokens=NEW_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == expected["text"]
    finish_reasons = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finish_reasons[-1] == expected["finish_reason"]
    assert set(finish_reasons[:-1]) == {None}
    # The usage chunk comes last, with no choices; the others carry "usage": null.
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_completion_matches_generate(api, client, model_name):
    expected = greedy(client, model_name, prompt="Hello")

    completion = api.completions.create(
        model=model_name, prompt="Hello", max_tokens=NEW_TOKENS, temperature=0
    )

    assert completion.object == "text_completion"
    assert completion.choices[0].text == expected["text"]
    assert completion.choices[0].finish_reason == expected["finish_reason"]
    assert completion.usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_completion_stream(api, client, model_name):
    expected = greedy(client, model_name, prompt="Hello", stop=["zz"])

    stream = api.completions.create(
        model=model_name, prompt="Hello", max_tokens=NEW_TOKENS, temperature=0, stop=["zz"],
        stream=True,
    )
    chunks = list(stream)

    assert "".join(chunk.choices[0].text for chunk in chunks) == expected["text"]
    assert chunks[-1].choices[0].finish_reason == expected["finish_reason"]
    assert all(chunk.usage is None for chunk in chunks)


def test_completion_accepts_token_ids(api, server, client, model_name):
    expected = greedy(client, model_name, prompt="Hello")
    token_ids = load_tokenizer(server.data_dir / "merged" / model_name)("Hello").input_ids

    completion = api.completions.create(
        model=model_name, prompt=token_ids, max_tokens=NEW_TOKENS, temperature=0
    )

    assert completion.choices[0].text == expected["text"]


def test_seed_makes_sampling_repeatable(api, model_name):
    def sample(seed: int) -> str:
        completion = api.completions.create(
            model=model_name, prompt="Hello", max_tokens=12, temperature=1.0, top_p=0.9,
            seed=seed,
        )
        return completion.choices[0].text

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


def test_models_list_and_retrieve(api, model_name):
    ids = [model.id for model in api.models.list()]

    assert model_name in ids
    assert "base/tiny-llama" in ids
    retrieved = api.models.retrieve("base/tiny-llama")
    assert retrieved.id == "base/tiny-llama"
    assert retrieved.owned_by == "furina-serve"


def test_n_above_one_rejected(api, model_name):
    with pytest.raises(openai.BadRequestError) as raised:
        api.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=4, n=2)

    assert raised.value.status_code == 400
    assert raised.value.body["param"] == "n"
    assert "n must be 1" in raised.value.body["message"]


def test_unknown_model_not_found(api):
    with pytest.raises(openai.NotFoundError) as raised:
        api.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)

    assert raised.value.body["code"] == "model_not_found"
    assert "'no-such-model' not found" in raised.value.body["message"]


def test_max_tokens_above_cap_rejected(api, model_name):
    with pytest.raises(openai.BadRequestError) as raised:
        api.completions.create(model=model_name, prompt="x", max_tokens=100_000)

    assert raised.value.body["param"] == "max_tokens"
    assert "cap of 512" in raised.value.body["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"messages": []}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
        ),
    ],
)
def test_error_body_has_openai_shape(client, model_name, body, param):
    request = {"model": model_name, "messages": MESSAGES, "max_tokens": 4, **body}

    response = client.post("/v1/chat/completions", json=request)

    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_batch_of_prompts_rejected(client, model_name):
    response = client.post(
        "/v1/completions", json={"model": model_name, "prompt": ["a", "b"], "max_tokens": 2}
    )

    assert response.status_code == 400
    assert "one prompt per request" in response.json()["error"]["message"]


def test_chat_default_max_tokens_fits_context(api, model_name):
    # The tiny model's context is 2048 tokens; the cap of 512 would not fit after this.
    long_message = [{"role": "user", "content": "a" * 2000}]

    completion = api.chat.completions.create(
        model=model_name, messages=long_message, temperature=0
    )

    usage = completion.usage
    assert usage.prompt_tokens > 2000
    assert usage.total_tokens <= 2048
    if completion.choices[0].finish_reason == "length":
        assert usage.total_tokens == 2048


def test_text_content_parts_accepted(api, client, model_name):
    expected = greedy(client, model_name, messages=MESSAGES)
    parts = [{"type": "text", "text": MESSAGES[0]["content"]}]

    completion = api.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": parts}],
        max_tokens=NEW_TOKENS,
        temperature=0,
    )

    assert completion.choices[0].message.content == expected["text"]
