"""The "openai" generation backend: a front server forwarding to a second server as its engine.

The engine is a plain `furina serve` with a merged model that the front server's own
data directory does not have, so every response about that model must come from the engine.
Error mapping is tested on RemoteEngine directly with httpx.MockTransport.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator

import httpx
import openai
import pytest
from pydantic import ValidationError
from service_support import copy_data_dir, running_server
from test_generate import MESSAGES, NEW_TOKENS, stream_events, write_varied_merged_model

from service.generation import GenerationResult, SamplingParams, TextDelta
from service.metrics import ServiceMetrics
from service.remote_engine import EngineError, EngineRejected, EngineTimeout, RemoteEngine
from service.settings import Settings

ENGINE_MODEL = "engine-only"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engine_server(data_dir_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    data_dir = copy_data_dir(data_dir_template, root / "data")
    write_varied_merged_model(data_dir, ENGINE_MODEL)
    with running_server(data_dir, root / "server.log") as handle:
        yield handle


@pytest.fixture(scope="module")
def front_server(engine_server, data_dir_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("front")
    data_dir = copy_data_dir(data_dir_template, root / "data")
    env = {
        "FURINA_GENERATION_BACKEND": "openai",
        "FURINA_ENGINE_URL": f"{engine_server.base_url}/v1",
    }
    with running_server(data_dir, root / "server.log", env) as handle:
        yield handle


@pytest.fixture
def engine_client(engine_server) -> Iterator[httpx.Client]:
    with engine_server.client() as http:
        yield http


@pytest.fixture
def front_client(front_server) -> Iterator[httpx.Client]:
    with front_server.client() as http:
        yield http


def post_generate(client: httpx.Client, **body) -> dict:
    body = {"model": ENGINE_MODEL, "max_new_tokens": NEW_TOKENS, **body}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def closed_port() -> int:
    """Return a loopback port that nothing listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_front_lacks_engine_model(front_server):
    assert not (front_server.data_dir / "merged" / ENGINE_MODEL).exists()


@pytest.mark.parametrize("request_input", [{"prompt": PROMPT}, {"messages": MESSAGES}])
def test_generate_matches_engine(front_client, engine_client, request_input):
    expected = post_generate(engine_client, **request_input)

    result = post_generate(front_client, **request_input)

    assert expected["text"]
    assert result["model"] == ENGINE_MODEL
    assert result["text"] == expected["text"]
    assert result["finish_reason"] == expected["finish_reason"]
    assert result["usage"] == expected["usage"]
    timings = result["timings"]
    assert 0 < timings["time_to_first_token"] <= timings["total"]
    assert timings["tokens_per_second"] == pytest.approx(
        result["usage"]["completion_tokens"] / timings["total"]
    )


def test_generate_stream_matches_engine(front_client, engine_client):
    expected = post_generate(engine_client, prompt=PROMPT)

    events = stream_events(
        front_client, model=ENGINE_MODEL, prompt=PROMPT, max_new_tokens=NEW_TOKENS
    )

    names = [name for name, _ in events]
    assert names[-2:] == ["final", "done"]
    assert set(names[:-2]) == {"token"}
    text = "".join(json.loads(data)["text"] for name, data in events if name == "token")
    assert text == expected["text"]
    final = json.loads(events[-2][1])
    assert final["model"] == ENGINE_MODEL
    assert final["finish_reason"] == expected["finish_reason"]
    assert final["usage"] == expected["usage"]
    assert 0 < final["timings"]["time_to_first_token"] <= final["timings"]["total"]


def test_chat_completion_through_front(front_server, engine_client):
    expected = post_generate(engine_client, messages=MESSAGES)
    api = openai.OpenAI(base_url=f"{front_server.base_url}/v1", api_key="unused", max_retries=0)

    with api:
        completion = api.chat.completions.create(
            model=ENGINE_MODEL, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0
        )
        chunks = list(
            api.chat.completions.create(
                model=ENGINE_MODEL,
                messages=MESSAGES,
                max_tokens=NEW_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )

    assert completion.model == ENGINE_MODEL
    assert completion.choices[0].message.content == expected["text"]
    assert completion.usage.completion_tokens == expected["usage"]["completion_tokens"]
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == expected["text"]
    assert chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_models_listed_from_engine(front_client, engine_client):
    response = front_client.get("/v1/models")

    assert response.status_code == 200, response.text
    ids = [card["id"] for card in response.json()["data"]]
    assert ENGINE_MODEL in ids
    assert ids == [card["id"] for card in engine_client.get("/v1/models").json()["data"]]
    one = front_client.get(f"/v1/models/{ENGINE_MODEL}")
    assert one.status_code == 200, one.text
    assert one.json()["id"] == ENGINE_MODEL


def test_engine_client_errors_passed_on(front_server, front_client):
    response = front_client.post("/generate", json={"model": "missing", "prompt": PROMPT})

    assert response.status_code == 404, response.text
    assert "'missing' not found" in response.json()["detail"]
    api = openai.OpenAI(base_url=f"{front_server.base_url}/v1", api_key="unused", max_retries=0)
    with api, pytest.raises(openai.NotFoundError) as raised:
        api.chat.completions.create(model="missing", messages=MESSAGES, max_tokens=4)
    assert "'missing' not found" in raised.value.message


def test_ready_checks_engine(front_client):
    response = front_client.get("/ready")

    assert response.status_code == 200, response.text
    assert response.json()["checks"]["engine"] == "ok"


def test_engine_down_gives_502(data_dir, start_server):
    engine_url = f"http://127.0.0.1:{closed_port()}/v1"
    env = {"FURINA_GENERATION_BACKEND": "openai", "FURINA_ENGINE_URL": engine_url}
    server = start_server(data_dir, env)

    with server.client() as http:
        generate = http.post("/generate", json={"model": ENGINE_MODEL, "prompt": PROMPT})
        chat = http.post(
            "/v1/chat/completions", json={"model": ENGINE_MODEL, "messages": MESSAGES}
        )
        ready = http.get("/ready")

    assert generate.status_code == 502, generate.text
    assert f"engine {engine_url} is unreachable" in generate.json()["detail"]
    assert chat.status_code == 502, chat.text
    assert f"engine {engine_url} is unreachable" in chat.json()["error"]["message"]
    assert ready.status_code == 503, ready.text
    assert engine_url in ready.json()["checks"]["engine"]


def test_openai_backend_needs_engine_url():
    with pytest.raises(ValidationError, match="FURINA_ENGINE_URL"):
        Settings(generation_backend="openai")


def test_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("FURINA_API_KEY", "")
    monkeypatch.setenv("FURINA_ENGINE_URL", "")

    settings = Settings()

    assert settings.api_key is None
    assert settings.engine_url is None


# RemoteEngine against mock engines.

ENGINE_URL = "http://engine.test:8000/v1"
PARAMS = SamplingParams(max_new_tokens=4, temperature=0.0, top_k=5, stop=("\n",))


def mock_engine(handler, **settings) -> RemoteEngine:
    settings = Settings(generation_backend="openai", engine_url=ENGINE_URL, **settings)
    return RemoteEngine(settings, transport=httpx.MockTransport(handler))


def sse_body(*chunks: dict) -> bytes:
    lines = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks]
    return "".join([*lines, "data: [DONE]\n\n"]).encode()


def run_generation(engine: RemoteEngine, **inputs) -> list[TextDelta | GenerationResult]:
    async def run() -> list[TextDelta | GenerationResult]:
        try:
            remote = await engine.open_generation(
                "m", inputs.get("prompt"), inputs.get("messages"), PARAMS, ServiceMetrics()
            )
            return [event async for event in remote.events]
        finally:
            await engine.aclose()

    return asyncio.run(run())


def test_generation_request_and_result():
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        body = sse_body(
            {"choices": [{"index": 0, "text": "Par", "finish_reason": None}]},
            {"choices": [{"index": 0, "text": "is", "finish_reason": "length"}]},
            {"choices": [], "usage": usage},
        )
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    events = run_generation(mock_engine(handler, engine_api_key="secret"), prompt="Capital:")

    assert [event.text for event in events[:-1]] == ["Par", "is"]
    result = events[-1]
    assert result.text == "Paris"
    assert result.finish_reason == "length"
    assert (result.prompt_tokens, result.completion_tokens) == (3, 2)
    assert str(sent[0].url) == f"{ENGINE_URL}/completions"
    assert sent[0].headers["authorization"] == "Bearer secret"
    payload = json.loads(sent[0].content)
    assert payload["prompt"] == "Capital:"
    assert payload["max_tokens"] == 4
    assert payload["top_k"] == 5
    assert payload["stop"] == ["\n"]
    assert payload["stream_options"] == {"include_usage": True}


def test_chat_messages_sent_to_chat_completions():
    paths = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        body = sse_body(
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
            {"choices": [{"index": 0, "delta": {"content": "4"}, "finish_reason": "stop"}]},
            {"choices": [], "usage": usage},
        )
        return httpx.Response(200, content=body)

    events = run_generation(mock_engine(handler), messages=MESSAGES)

    assert paths == ["/v1/chat/completions"]
    assert events[-1].text == "4"
    assert events[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    ("status", "error_type", "expected_status", "fragment"),
    [
        (500, EngineError, 502, f"engine {ENGINE_URL} failed on completions with 500: boom"),
        (401, EngineError, 502, "Check FURINA_ENGINE_API_KEY"),
        (400, EngineRejected, 400, "boom"),
    ],
)
def test_engine_status_mapped(status, error_type, expected_status, fragment):
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": {"message": "boom", "type": "x", "param": "top_k"}}
        return httpx.Response(status, json=body)

    with pytest.raises(error_type) as raised:
        run_generation(mock_engine(handler), prompt="x")

    assert raised.value.status_code == expected_status
    assert fragment in raised.value.detail


def test_engine_timeout_gives_504():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(EngineTimeout) as raised:
        run_generation(mock_engine(handler, engine_timeout_seconds=2), prompt="x")

    assert raised.value.status_code == 504
    assert f"engine {ENGINE_URL} timed out on completions after 2.0 s" in raised.value.detail


@pytest.mark.parametrize(
    ("chunks", "fragment"),
    [
        ([{"choices": [{"index": 0, "text": "a", "finish_reason": "length"}]}], "sent no usage"),
        (
            [
                {"choices": [{"index": 0, "text": "a", "finish_reason": None}]},
                {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
            ],
            "finish_reason None",
        ),
        ([{"error": {"message": "engine crashed"}}], "engine crashed"),
    ],
)
def test_incomplete_stream_rejected(chunks, fragment):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse_body(*chunks))

    with pytest.raises(EngineError) as raised:
        run_generation(mock_engine(handler), prompt="x")

    assert raised.value.status_code == 502
    assert fragment in raised.value.detail


def test_dropped_stream_gives_502():
    async def dropped_stream():
        yield b'data: {"choices": [{"index": 0, "text": "a", "finish_reason": null}]}\n\n'
        raise httpx.ReadError("connection reset by peer")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=dropped_stream())

    with pytest.raises(EngineError) as raised:
        run_generation(mock_engine(handler), prompt="x")

    assert raised.value.status_code == 502
    assert f"connection to engine {ENGINE_URL} failed during completions" in raised.value.detail
    assert "connection reset by peer" in raised.value.detail
