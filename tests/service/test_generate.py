"""POST /generate on the real server, the decode loop, and the model registry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from service_support import write_tiny_adapter

from furina.adapter import FurinaAdapterConfig, save_adapter
from furina.checkpoint import checkpoint_fingerprint, load_causal_lm, load_tokenizer
from furina.inject import DEFAULT_TARGET_MODULES, adapter_state_dict, furina_layers, inject_furina
from furina.layer import FurinaHyperparameters
from furina.synthetic import write_random_llama
from merger import merge
from service.generation import SamplingParams, encode_prompt, run_generation
from service.metrics import ServiceMetrics
from service.models import ModelRegistry, NoModelError
from service.routers.generate import PreparedGeneration, collect_generation, generation_events
from service.settings import Settings

PROMPTS = ["Hello", "The capital of France is", "def f(x):"]
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
NEW_TOKENS = 24
# SmolLM2-135M decodes about 14 tokens/s on 2 CPU cores: keep the real-model test short.
REAL_NEW_TOKENS = 12


def write_varied_merged_model(data_dir: Path, name: str) -> Path:
    """Merge a tiny adapter into a random Llama whose greedy output is not one repeated token.

    The fixture's tiny base (initializer_range 0.02) generates the same token again and
    again, which would let a wrong decode loop pass; initializer_range 0.2 does not.
    """
    base_dir = write_random_llama(data_dir / "base" / name, seed=3, initializer_range=0.2)
    adapter_dir = write_tiny_adapter(base_dir, data_dir / "adapters" / name)
    output_dir = data_dir / "merged" / name
    merge(base_dir, adapter_dir, output_dir, verify=False)
    return output_dir


@pytest.fixture(scope="module")
def varied_model(server) -> str:
    """Name of a merged model with varied greedy output, in the session server's data dir."""
    name = f"varied-{uuid.uuid4().hex[:8]}"
    write_varied_merged_model(server.data_dir, name)
    return name


@pytest.fixture(scope="module")
def reference(server, varied_model):
    """The varied merged model and its tokenizer, loaded in this process."""
    path = server.data_dir / "merged" / varied_model
    return load_causal_lm(path), load_tokenizer(path)


def transformers_greedy(model, input_ids: list[int], new_tokens: int) -> list[int]:
    output = model.generate(
        torch.tensor([input_ids]), do_sample=False, max_new_tokens=new_tokens
    )
    return output[0, len(input_ids) :].tolist()


def generate(client: httpx.Client, **body) -> dict:
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(client: httpx.Client, **body) -> list[tuple[str, str]]:
    """POST /generate with stream: true; return the (event, data) pairs in order."""
    events = []
    with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((event, line.removeprefix("data: ")))
    return events


def generated_tokens_total(client: httpx.Client) -> float:
    metrics = client.get("/metrics").text
    match = re.search(r"^furina_generated_tokens_total (\S+)$", metrics, re.MULTILINE)
    assert match, metrics
    return float(match.group(1))


def test_generate_plain_prompt(client, varied_model):
    result = generate(client, model=varied_model, prompt="Hello", max_new_tokens=8)

    assert result["model"] == varied_model
    assert result["finish_reason"] in ("stop", "length")
    assert result["usage"]["prompt_tokens"] == len("Hello")  # one byte-level token per byte
    assert 1 <= result["usage"]["completion_tokens"] <= 8
    assert result["usage"]["total_tokens"] == (
        result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"]
    )
    timings = result["timings"]
    assert 0 < timings["time_to_first_token"] <= timings["total"]
    assert timings["tokens_per_second"] == pytest.approx(
        result["usage"]["completion_tokens"] / timings["total"]
    )


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers_generate(client, varied_model, reference, prompt):
    model, tokenizer = reference
    input_ids = tokenizer(prompt).input_ids
    expected_ids = transformers_greedy(model, input_ids, NEW_TOKENS)
    expected_text = tokenizer.decode(expected_ids, skip_special_tokens=True)

    result = generate(client, model=varied_model, prompt=prompt, max_new_tokens=NEW_TOKENS)

    # A model that repeats one token would let an off-by-one decode loop pass.
    assert len(set(expected_ids)) > 3
    assert result["text"] == expected_text
    assert result["usage"]["completion_tokens"] == len(expected_ids)
    eos_id = model.generation_config.eos_token_id
    expected_finish = "stop" if expected_ids[-1] == eos_id else "length"
    assert result["finish_reason"] == expected_finish


def test_chat_messages_match_transformers_generate(client, varied_model, reference):
    model, tokenizer = reference
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    input_ids = tokenizer(rendered, add_special_tokens=False).input_ids
    expected_ids = transformers_greedy(model, input_ids, NEW_TOKENS)

    result = generate(client, model=varied_model, messages=MESSAGES, max_new_tokens=NEW_TOKENS)

    assert result["usage"]["prompt_tokens"] == len(input_ids)
    assert result["text"] == tokenizer.decode(expected_ids, skip_special_tokens=True)


def test_stream_matches_plain(client, varied_model):
    body = {"model": varied_model, "prompt": PROMPTS[1], "max_new_tokens": NEW_TOKENS}
    plain = generate(client, **body)

    events = stream_events(client, **body)

    names = [name for name, _ in events]
    assert names[-2:] == ["final", "done"]
    assert set(names[:-2]) == {"token"}
    assert len(names) > 3
    text = "".join(json.loads(data)["text"] for name, data in events if name == "token")
    assert text == plain["text"]
    final = json.loads(events[-2][1])
    assert final["finish_reason"] == plain["finish_reason"]
    assert final["usage"] == plain["usage"]
    assert final["timings"]["time_to_first_token"] > 0
    assert events[-1][1] == "[DONE]"


def greedy_stop_string(text: str) -> str:
    """A two-character piece of text after its first few characters, without U+FFFD."""
    for start in range(4, len(text) - 2):
        piece = text[start : start + 2]
        if "\ufffd" not in piece:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_text(client, varied_model, stream):
    body = {"model": varied_model, "prompt": PROMPTS[0], "max_new_tokens": NEW_TOKENS}
    full = generate(client, **body)["text"]
    stop = greedy_stop_string(full)
    expected = full[: full.find(stop)]

    if stream:
        events = stream_events(client, **body, stop=[stop, "never-generated"])
        text = "".join(json.loads(data)["text"] for name, data in events if name == "token")
        finish_reason = json.loads(events[-2][1])["finish_reason"]
    else:
        result = generate(client, **body, stop=stop)
        text, finish_reason = result["text"], result["finish_reason"]

    assert text == expected
    assert finish_reason == "stop"


def test_seeded_sampling_is_repeatable(client, varied_model):
    body = {"model": varied_model, "prompt": "Hello", "max_new_tokens": 16, "temperature": 1.0}

    first = generate(client, **body, seed=1234)["text"]
    again = generate(client, **body, seed=1234)["text"]
    other = generate(client, **body, seed=4321)["text"]

    assert first == again
    assert first != other


@pytest.mark.parametrize("options", [{"top_k": 1}, {"top_p": 1e-6}])
def test_sampling_with_one_candidate_is_greedy(client, varied_model, options):
    body = {"model": varied_model, "prompt": "Hello", "max_new_tokens": 16}
    greedy = generate(client, **body)["text"]

    sampled = generate(client, **body, temperature=0.8, seed=7, **options)["text"]

    assert sampled == greedy


def test_base_model_id_generates(client):
    result = generate(client, model="base/tiny-llama", prompt="Hi", max_new_tokens=3)

    assert result["model"] == "base/tiny-llama"
    assert result["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "messages": MESSAGES}, "exactly one of 'prompt' and 'messages'"),
        ({}, "exactly one of 'prompt' and 'messages'"),
        ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 513}, "cap of 512"),
        ({"prompt": "x", "temperature": -0.1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "top_k": -1}, "top_k"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings"),
        ({"prompt": "x", "stop": ""}, "must not be empty"),
        ({"prompt": "x", "colour": "blue"}, "colour"),
        ({"messages": []}, "messages"),
    ],
)
def test_invalid_request_rejected(client, varied_model, body, field):
    response = client.post("/generate", json={"model": varied_model, **body})

    assert response.status_code == 422
    assert field in json.dumps(response.json()["detail"])


def test_prompt_longer_than_context_rejected(client, varied_model):
    response = client.post(
        "/generate", json={"model": varied_model, "prompt": "a" * 2040, "max_new_tokens": 16}
    )

    assert response.status_code == 422
    assert "context length is 2048" in response.json()["detail"]


def test_unknown_model_not_found(client):
    response = client.post("/generate", json={"model": "no-such-model", "prompt": "x"})

    assert response.status_code == 404
    assert "'no-such-model' not found" in response.json()["detail"]
    assert "GET /v1/models" in response.json()["detail"]


def test_model_path_rejected(client):
    response = client.post("/generate", json={"model": "../base/tiny-llama", "prompt": "x"})

    assert response.status_code == 400


def test_no_default_model_rejected(client):
    # The session server has no FURINA_DEFAULT_MODEL and no merged/demo.
    response = client.post("/generate", json={"prompt": "x"})

    assert response.status_code == 422
    assert "FURINA_DEFAULT_MODEL" in response.json()["detail"]


def test_generated_tokens_counted_and_logged(server, client, varied_model):
    before = generated_tokens_total(client)
    request_id = f"gen-log-{uuid.uuid4().hex[:8]}"

    response = client.post(
        "/generate",
        json={"model": varied_model, "prompt": "Hello", "max_new_tokens": 5},
        headers={"X-Request-ID": request_id},
    )

    completion_tokens = response.json()["usage"]["completion_tokens"]
    assert generated_tokens_total(client) == before + completion_tokens
    log_line = next(line for line in server.log().splitlines() if f"[{request_id}]" in line)
    assert f"generated {completion_tokens} tokens with model {varied_model}" in log_line
    assert "time to first token" in log_line


# The decode loop and its event-loop bridge, in this process.


@pytest.fixture(scope="module")
def varied_loaded(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("registry-data")
    write_varied_merged_model(data_dir, "varied")
    registry = ModelRegistry(Settings(data_dir=data_dir))
    return registry.get("varied")


class ForwardCounter:
    """Counts the forward calls of a model while in a `with` block."""

    def __init__(self, model) -> None:
        self.model = model
        self.calls = 0

    def __enter__(self) -> ForwardCounter:
        self.handle = self.model.register_forward_hook(self._count)
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.remove()

    def _count(self, *args) -> None:
        self.calls += 1


def test_stop_event_cancels_decode_loop(varied_loaded):
    stop_event = threading.Event()
    stop_event.set()
    input_ids = encode_prompt(varied_loaded.tokenizer, "Hello")

    result = run_generation(
        varied_loaded.model, varied_loaded.tokenizer, input_ids,
        SamplingParams(max_new_tokens=50), stop_event,
    )

    assert result.finish_reason == "cancelled"
    assert result.completion_tokens == 0


def test_closed_stream_stops_worker(varied_loaded):
    """A consumer that stops reading (a disconnected streaming client) ends the worker early."""
    max_new_tokens = 1500
    prepared = PreparedGeneration(
        varied_loaded,
        encode_prompt(varied_loaded.tokenizer, "Hello"),
        SamplingParams(max_new_tokens=max_new_tokens),
    )

    async def read_one_event() -> None:
        events = generation_events(prepared, ServiceMetrics())
        async with contextlib.aclosing(events):
            async for _ in events:
                break

    with ForwardCounter(varied_loaded.model) as counter:
        asyncio.run(read_one_event())  # waits for the worker thread on shutdown
        assert varied_loaded.lock.acquire(timeout=60)
        varied_loaded.lock.release()

    assert 1 <= counter.calls < max_new_tokens


def test_disconnected_client_stops_generation(varied_loaded):
    class DisconnectedRequest:
        async def is_disconnected(self) -> bool:
            return True

    max_new_tokens = 1500
    prepared = PreparedGeneration(
        varied_loaded,
        encode_prompt(varied_loaded.tokenizer, "Hello"),
        SamplingParams(max_new_tokens=max_new_tokens),
    )
    metrics = ServiceMetrics()

    result = asyncio.run(collect_generation(prepared, DisconnectedRequest(), metrics))

    assert result.finish_reason == "cancelled"
    assert result.completion_tokens < max_new_tokens
    counted = metrics.registry.get_sample_value("furina_generated_tokens_total")
    assert counted == result.completion_tokens


# ModelRegistry.


def test_registry_default_model(tmp_path):
    (tmp_path / "merged" / "demo").mkdir(parents=True)
    (tmp_path / "merged" / "demo" / "config.json").write_text("{}")
    (tmp_path / "base").mkdir()

    assert ModelRegistry(Settings(data_dir=tmp_path)).resolve(None).id == "demo"
    configured = Settings(data_dir=tmp_path, default_model="base/x")
    assert ModelRegistry(configured).default_model_id() == "base/x"
    (tmp_path / "merged" / "demo" / "config.json").unlink()
    with pytest.raises(NoModelError, match="FURINA_DEFAULT_MODEL"):
        ModelRegistry(Settings(data_dir=tmp_path)).resolve(None)


def test_registry_evicts_least_recently_used(tmp_path):
    for name, seed in (("a", 0), ("b", 1)):
        write_random_llama(tmp_path / "base" / name, seed=seed)
    registry = ModelRegistry(Settings(data_dir=tmp_path, model_cache_size=1))

    first = registry.get("base/a")
    assert registry.get("base/a") is first
    registry.get("base/b")

    assert registry.loaded_ids() == ["base/b"]
    assert registry.get("base/a") is not first


def test_registry_reloads_replaced_model(tmp_path):
    write_random_llama(tmp_path / "base" / "a", seed=0)
    registry = ModelRegistry(Settings(data_dir=tmp_path))
    first = registry.get("base/a")

    (tmp_path / "base" / "a").rename(tmp_path / "base" / "old")
    write_random_llama(tmp_path / "base" / "a", seed=1)
    second = registry.get("base/a")

    assert second is not first
    first_weight = first.model.model.embed_tokens.weight
    assert not torch.equal(second.model.model.embed_tokens.weight, first_weight)


def test_registry_lists_merged_then_base(tmp_path):
    write_random_llama(tmp_path / "base" / "b1")
    (tmp_path / "merged" / "m1").mkdir(parents=True)
    (tmp_path / "merged" / "m1" / "config.json").write_text("{}")
    (tmp_path / "merged" / ".m2.tmp").mkdir()
    (tmp_path / "merged" / "no-config").mkdir()

    ids = [entry.id for entry in ModelRegistry(Settings(data_dir=tmp_path)).list_models()]

    assert ids == ["m1", "base/b1"]


# One test on the real SmolLM2-135M base.


def write_real_adapter(base_dir: Path, adapter_dir: Path) -> Path:
    """A FURINA adapter for the real base with random magnitudes and shared experts."""
    hparams = FurinaHyperparameters(r=4, lora_alpha=8.0, num_experts=4, num_shared_experts=1)
    model = load_causal_lm(base_dir)
    inject_furina(model, hparams)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in furina_layers(model):
            magnitude = torch.randn(layer.furina_magnitude.shape, generator=generator)
            layer.furina_magnitude.copy_(0.02 * magnitude)
            shared_B = torch.randn(layer.furina_B[:1].shape, generator=generator)
            layer.furina_B[:1] = 0.01 * shared_B
    config = FurinaAdapterConfig(
        base_model_name_or_path=str(base_dir),
        base_model_fingerprint=checkpoint_fingerprint(base_dir),
        r=hparams.r,
        lora_alpha=hparams.lora_alpha,
        num_experts=hparams.num_experts,
        num_shared_experts=hparams.num_shared_experts,
        top_k=hparams.top_k,
        eps=hparams.eps,
        target_modules=list(DEFAULT_TARGET_MODULES),
        selection_loss_weight=0.01,
    )
    return save_adapter(adapter_dir, config, adapter_state_dict(model))


@pytest.mark.real_model
def test_real_model_greedy_matches_transformers(real_base_dir, tmp_path, start_server):
    data_dir = tmp_path / "data"
    for root in ("base", "adapters", "merged"):
        (data_dir / root).mkdir(parents=True)
    adapter_dir = write_real_adapter(real_base_dir, tmp_path / "adapter")
    merged_dir = data_dir / "merged" / "smollm2-furina"
    merge(real_base_dir, adapter_dir, merged_dir, verify=False)
    model, tokenizer = load_causal_lm(merged_dir), load_tokenizer(merged_dir)
    server = start_server(data_dir)

    with server.client() as client:
        options = {"model": "smollm2-furina", "max_new_tokens": REAL_NEW_TOKENS}
        chat = generate(client, messages=MESSAGES, **options)
        plain = generate(client, prompt=PROMPTS[1], **options)

    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(rendered, add_special_tokens=False).input_ids
    expected_chat = transformers_greedy(model, chat_ids, REAL_NEW_TOKENS)
    expected_plain = transformers_greedy(model, tokenizer(PROMPTS[1]).input_ids, REAL_NEW_TOKENS)
    assert chat["text"] == tokenizer.decode(expected_chat, skip_special_tokens=True)
    assert chat["usage"]["completion_tokens"] == len(expected_chat)
    assert plain["text"] == tokenizer.decode(expected_plain, skip_special_tokens=True)
    assert plain["usage"]["completion_tokens"] == len(expected_plain)
