"""POST /generate: text from a merged or base model, whole or streamed as Server-Sent Events.

The decode loop (service.generation) runs in a worker thread while it holds the
model's lock; this module bridges it to the event loop. The OpenAI-compatible router
reuses `prepare_generation`, `generation_events` and `collect_generation`. Every
generation, finished or cancelled, is logged at INFO with its timings and counted in
the generated-tokens metric by the worker. Local generations take a slot of
service.generation_slots first, so overload gets 503 with Retry-After instead of a
growing backlog.

With settings.generation_backend "openai", the handler sends the request to the
OpenAI-compatible engine through service.remote_engine instead, and returns
responses in the same shapes.

Stream format of `stream: true`:

    event: token   data: {"text": "..."}          one per text delta
    event: final   data: {"model", "finish_reason", "usage", "timings"}
    event: done    data: [DONE]

An error after the stream has started is sent as `event: error` with {"detail": ...}.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from service.errors import ServiceError, error_responses, validation_error_responses
from service.generation import (
    FINISH_CANCELLED,
    GenerationResult,
    PromptError,
    SamplingParams,
    TextDelta,
    check_context_length,
    encode_prompt,
    stream_generation,
)
from service.generation_slots import GenerationSlot, GenerationSlots
from service.metrics import ServiceMetrics, get_metrics
from service.models import LoadedModel, ModelRegistry
from service.remote_engine import EngineDep, RemoteEngine
from service.settings import Settings

logger = logging.getLogger(__name__)

router = APIRouter(tags=["generation"])

MAX_STOP_STRINGS = 4
# How often a non-streaming request checks whether its client is still connected.
DISCONNECT_POLL_SECONDS = 0.25


class ChatMessage(BaseModel):
    """One chat message, rendered with the model's chat template."""

    role: str = Field(min_length=1, examples=["user"])
    content: str


class GenerateRequest(BaseModel):
    """Body of POST /generate. Send exactly one of prompt and messages."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None, description="model id (GET /v1/models); default: the default model"
    )
    prompt: str | None = Field(default=None, description="plain text, tokenized as is")
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, description="chat messages, rendered with the chat template"
    )
    max_new_tokens: int = Field(
        default=64,
        ge=1,
        description="maximum number of tokens to generate, at most FURINA_MAX_NEW_TOKENS_CAP",
    )
    temperature: float = Field(default=0.0, ge=0, description="0 means greedy decoding")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(default=0, ge=0, description="sample among the k most likely tokens; 0: all")
    seed: int | None = Field(default=None, description="seed of the sampling random generator")
    stop: str | list[str] | None = Field(
        default=None, description=f"up to {MAX_STOP_STRINGS} strings that end the generation"
    )
    stream: bool = Field(default=False, description="send Server-Sent Events token by token")

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' and 'messages'")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    """Seconds from the start of the prefill; model loading and queueing are not included."""

    time_to_first_token: float
    total: float
    tokens_per_second: float


class GenerateResponse(BaseModel):
    model: str
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    timings: Timings


@dataclass
class PreparedGeneration:
    """A loaded model, the encoded prompt, validated sampling settings and the generation slot.

    generation_events releases the slot when the decode loop ends.
    """

    loaded: LoadedModel
    input_ids: list[int]
    params: SamplingParams
    slot: GenerationSlot | None = None


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.models


RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]


@router.post(
    "/generate",
    response_model=GenerateResponse,
    summary="Generate text with a model",
    responses={
        **error_responses(400, 401, 404, 413, 502, 503, 504),
        **validation_error_responses(),
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream"},
    },
)
async def generate(
    body: GenerateRequest,
    request: Request,
    registry: RegistryDep,
    metrics: MetricsDep,
    engine: EngineDep,
):
    settings: Settings = request.app.state.settings
    check_max_new_tokens(body.max_new_tokens, settings, "max_new_tokens")
    params = SamplingParams(
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=stop_strings(body.stop, "stop"),
    )
    messages = None if body.messages is None else [m.model_dump() for m in body.messages]
    if engine is not None:
        return await _generate_remote(engine, body, messages, params, metrics)
    slots = request.app.state.generation_slots
    prepared = await prepare_generation(
        registry, body.model, body.prompt, messages, params, slots=slots
    )

    if body.stream:
        events = generation_events(prepared, metrics, request)
        return StreamingResponse(
            _generate_stream(prepared.loaded.id, events), media_type="text/event-stream"
        )
    result = await collect_generation(prepared, request, metrics)
    if result.finish_reason == FINISH_CANCELLED:
        return client_gone_response()
    return _generate_response(prepared.loaded.id, result)


async def _generate_remote(
    engine: RemoteEngine,
    body: GenerateRequest,
    messages: list[dict] | None,
    params: SamplingParams,
    metrics: ServiceMetrics,
):
    """Run the request on the OpenAI-compatible engine (settings.generation_backend "openai")."""
    remote = await engine.open_generation(body.model, body.prompt, messages, params, metrics)
    if body.stream:
        return StreamingResponse(
            _generate_stream(remote.model, remote.events), media_type="text/event-stream"
        )
    # NOTE: unlike the local backend, this does not stop when the client disconnects.
    result = None
    async for event in remote.events:
        if isinstance(event, GenerationResult):
            result = event
    if result is None:
        raise AssertionError("engine stream ended without a result")
    return _generate_response(remote.model, result)


def _generate_response(model_id: str, result: GenerationResult) -> GenerateResponse:
    return GenerateResponse(
        model=model_id,
        text=result.text,
        finish_reason=result.finish_reason,
        usage=Usage(**result.usage()),
        timings=Timings(**result.timings()),
    )


def check_max_new_tokens(value: int, settings: Settings, field: str) -> None:
    """Raise a 422 validation error naming the cap when value is above it."""
    cap = settings.max_new_tokens_cap
    if value > cap:
        message = f"{field} is {value}, above this server's cap of {cap}"
        raise invalid_field(field, f"{message} (FURINA_MAX_NEW_TOKENS_CAP)")


def stop_strings(stop: str | list[str] | None, field: str) -> tuple[str, ...]:
    """Normalise a stop field to a tuple; rejects empty strings and more than 4 strings."""
    if stop is None:
        strings = []
    elif isinstance(stop, str):
        strings = [stop]
    else:
        strings = list(stop)
    if len(strings) > MAX_STOP_STRINGS:
        raise invalid_field(field, f"at most {MAX_STOP_STRINGS} stop strings, got {len(strings)}")
    if any(not string for string in strings):
        raise invalid_field(field, "stop strings must not be empty")
    return tuple(strings)


def invalid_field(field: str, message: str) -> RequestValidationError:
    """Build a request validation error (HTTP 422) on one body field, shaped like FastAPI's."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", field), "msg": message, "input": None}]
    )


class PromptRejected(ServiceError):
    """A prompt that does not fit the model: too long, empty, or messages without a template."""

    status_code = 422


async def prepare_generation(
    registry: ModelRegistry,
    model_id: str | None,
    prompt: str | list[int] | None,
    messages: list[dict] | None,
    params: SamplingParams,
    fit_context: bool = False,
    slots: GenerationSlots | None = None,
) -> PreparedGeneration:
    """Take a generation slot, load the model and encode the prompt; prompt may be token ids.

    With fit_context, max_new_tokens is lowered to what fits the model's context after
    the prompt (for requests that did not set it). With slots, a slot is taken first,
    which raises GenerationBusyError (503) when the queue is full. Pass the result to
    generation_events, which gives the slot back.
    """
    if slots is None:
        return await _load_and_encode(registry, model_id, prompt, messages, params, fit_context)

    # An unknown model gets its 404 at once instead of after a wait in the queue.
    await run_in_threadpool(registry.resolve, model_id)
    slot = await slots.acquire()
    try:
        prepared = await _load_and_encode(
            registry, model_id, prompt, messages, params, fit_context
        )
    except BaseException:
        slot.release()
        raise
    prepared.slot = slot
    return prepared


async def _load_and_encode(
    registry: ModelRegistry,
    model_id: str | None,
    prompt: str | list[int] | None,
    messages: list[dict] | None,
    params: SamplingParams,
    fit_context: bool,
) -> PreparedGeneration:
    loaded = await run_in_threadpool(registry.get, model_id)
    try:
        if isinstance(prompt, list):
            input_ids = checked_token_ids(prompt, loaded.model.config.vocab_size)
        else:
            input_ids = await run_in_threadpool(encode_prompt, loaded.tokenizer, prompt, messages)
        if fit_context:
            params = _fit_context(loaded, len(input_ids), params)
        check_context_length(loaded.model, len(input_ids), params.max_new_tokens)
    except PromptError as error:
        raise PromptRejected(f"model {loaded.id!r}: {error}") from error
    return PreparedGeneration(loaded, input_ids, params)


def _fit_context(loaded: LoadedModel, prompt_tokens: int, params: SamplingParams) -> SamplingParams:
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit is None or prompt_tokens + params.max_new_tokens <= limit:
        return params
    return dataclasses.replace(params, max_new_tokens=max(1, limit - prompt_tokens))


def checked_token_ids(token_ids: list[int], vocab_size: int) -> list[int]:
    """Return token ids given as a prompt after checking that each is in [0, vocab_size)."""
    for token in token_ids:
        if not 0 <= token < vocab_size:
            raise PromptError(
                f"prompt token id {token} is outside this model's vocabulary [0, {vocab_size})"
            )
    return list(token_ids)


def generation_events(
    prepared: PreparedGeneration, metrics: ServiceMetrics, request: Request | None = None
) -> AsyncIterator[TextDelta | GenerationResult]:
    """Start the decode loop in a worker thread; return an iterator of its events.

    The worker starts now, not at the first iteration, so that it gives back
    prepared.slot when it ends even if no client reads the events (a streaming client that
    left before the body was sent). When the consumer stops early or the request's
    client disconnects, the stop flag is set and the worker ends at its next token,
    releasing the model lock and the slot. Call it on the event loop.
    """
    stop_event = threading.Event()
    events: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    produce = _producer(prepared, metrics, stop_event, events, loop)
    context = contextvars.copy_context()  # the worker's log lines keep the request id
    if prepared.slot is not None:
        prepared.slot.start_clock()
    worker = loop.run_in_executor(None, context.run, produce)
    worker.add_done_callback(lambda _: _worker_done(prepared, stop_event))
    watcher = None if request is None else asyncio.create_task(_watch(request, stop_event))
    return _read_events(events, stop_event, watcher)


def _worker_done(prepared: PreparedGeneration, stop_event: threading.Event) -> None:
    stop_event.set()  # also ends the disconnect watcher
    if prepared.slot is not None:
        prepared.slot.release()


async def _read_events(
    events: asyncio.Queue, stop_event: threading.Event, watcher: asyncio.Task | None
) -> AsyncIterator[TextDelta | GenerationResult]:
    try:
        while True:
            event = await events.get()
            if event is _END:
                break
            if isinstance(event, BaseException):
                raise event
            yield event
    finally:
        stop_event.set()
        if watcher is not None:
            watcher.cancel()


async def collect_generation(
    prepared: PreparedGeneration, request: Request | None, metrics: ServiceMetrics
) -> GenerationResult:
    """Run a generation to the end and return its result."""
    result = None
    async for event in generation_events(prepared, metrics, request):
        if isinstance(event, GenerationResult):
            result = event
    if result is None:
        raise AssertionError("generation ended without a result")
    return result


def client_gone_response() -> Response:
    """Return the response to a request whose client disconnected, which is never sent.

    499 is nginx's "client closed request" code, so the access log shows what happened.
    """
    return Response(status_code=499)


def record_generation(
    prepared: PreparedGeneration, result: GenerationResult, metrics: ServiceMetrics
) -> None:
    """Count the generated tokens and log the request's timings."""
    metrics.generated_tokens.inc(result.completion_tokens)
    logger.info(
        "generated %d tokens with model %s from %d prompt tokens: finish_reason %s, "
        "time to first token %.3f s, total %.3f s, %.1f tokens/s",
        result.completion_tokens,
        prepared.loaded.id,
        result.prompt_tokens,
        result.finish_reason,
        result.time_to_first_token,
        result.total,
        result.tokens_per_second,
    )


def sse_event(data: dict | str, event: str | None = None) -> str:
    """Format one Server-Sent Event; dict data is sent as JSON."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n"


async def _generate_stream(
    model_id: str, events: AsyncIterator[TextDelta | GenerationResult]
) -> AsyncIterator[str]:
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                yield sse_event({"text": event.text}, "token")
                continue
            if event.finish_reason == FINISH_CANCELLED:
                return
            final = {
                "model": model_id,
                "finish_reason": event.finish_reason,
                "usage": event.usage(),
                "timings": event.timings(),
            }
            yield sse_event(final, "final")
        yield sse_event("[DONE]", "done")
    except Exception as error:
        # The status line is already sent: report the error inside the stream.
        logger.exception("streamed generation with model %s failed", model_id)
        yield sse_event({"detail": f"generation failed: {error}"}, "error")


_END = object()


def _producer(
    prepared: PreparedGeneration,
    metrics: ServiceMetrics,
    stop_event: threading.Event,
    events: asyncio.Queue,
    loop: asyncio.AbstractEventLoop,
):
    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:
            stop_event.set()  # the event loop is closed, so no consumer is left

    def produce() -> None:
        try:
            with prepared.loaded.lock:
                for event in stream_generation(
                    prepared.loaded.model,
                    prepared.loaded.tokenizer,
                    prepared.input_ids,
                    prepared.params,
                    stop_event,
                ):
                    if isinstance(event, GenerationResult):
                        record_generation(prepared, event, metrics)
                    put(event)
        except Exception as error:
            if stop_event.is_set():  # the consumer is gone and will not re-raise it
                logger.exception("generation with model %s failed", prepared.loaded.id)
            put(error)  # the event loop re-raises it to the request
        finally:
            put(_END)

    return produce


async def _watch(request: Request, stop_event: threading.Event) -> None:
    """Set stop_event when the client disconnects."""
    while not stop_event.is_set():
        if await request.is_disconnected():
            logger.info("client disconnected: stopping generation")
            stop_event.set()
            return
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
