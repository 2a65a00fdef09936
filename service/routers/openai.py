"""OpenAI-compatible API: /v1/chat/completions, /v1/completions and /v1/models.

The `openai` Python client works unchanged with base_url http://HOST:PORT/v1 (tests
run it). Supported: max_tokens (or max_completion_tokens), temperature, top_p, seed,
stop, n = 1, stream with stream_options.include_usage, and top_k as an extension, as
vLLM accepts it. Parameters that would change the output in ways this server does not
implement (penalties, logit_bias, logprobs, tools, n > 1, echo, suffix, best_of) are
rejected with 400 naming them; other unknown fields are ignored, as OpenAI-compatible
servers commonly do.

With settings.generation_backend "openai", every route here passes the request body,
once it has passed this module's validation, unchanged to the OpenAI-compatible engine
(service.remote_engine), which then decides about the parameters listed above.

Every error of these routes has OpenAI's body: {"error": {"message", "type", "param",
"code"}}. Validation errors are 400 here, as with OpenAI, not FastAPI's 422, and so is
a body that is not JSON. service.errors and service.middleware give the same body to
what fails before routing: an unknown /v1/ path (404), a body over
FURINA_MAX_BODY_BYTES (413).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from service.errors import ServiceError
from service.generation import FINISH_CANCELLED, GenerationResult, SamplingParams, TextDelta
from service.remote_engine import EngineDep
from service.request_context import request_id
from service.routers.generate import (
    MetricsDep,
    RegistryDep,
    check_max_new_tokens,
    client_gone_response,
    collect_generation,
    generation_events,
    invalid_field,
    prepare_generation,
    sse_event,
    stop_strings,
)
from service.settings import Settings

logger = logging.getLogger(__name__)

OWNER = "furina-serve"
# OpenAI's default max_tokens for /v1/completions. Chat completions default to the cap,
# lowered to what fits the model's context after the prompt.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
ERROR_CODES = {401: "invalid_api_key", 404: "model_not_found"}


def openai_error(
    status_code: int,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Build an error response with OpenAI's body."""
    body = {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status_code, "server_error"),
            "param": param,
            "code": ERROR_CODES.get(status_code),
        }
    }
    return JSONResponse(status_code=status_code, content=body, headers=headers)


class OpenAIRoute(APIRoute):
    """An APIRoute whose errors have OpenAI's body, validation and API key errors included."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def handle_with_openai_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as error:
                message, param = _describe_validation_error(error)
                return openai_error(400, message, param)
            except ServiceError as error:
                param = getattr(error, "param", None)
                return openai_error(error.status_code, error.detail, param, error.headers)
            except HTTPException as error:
                return openai_error(error.status_code, str(error.detail), headers=error.headers)
            except Exception:
                logger.exception("unhandled error in %s %s", request.method, request.url.path)
                message = (
                    "internal server error: the server log has the details for request id "
                    f"{request_id.get()}"
                )
                return openai_error(500, message)

        return handle_with_openai_errors


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """Body of every error response of these routes, as OpenAI sends it."""

    error: OpenAIErrorDetail


# Declared for the OpenAPI schema. The 422 entry replaces FastAPI's default one, whose
# body these routes never send (their validation errors are 400).
OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorBody, "description": description}
    for code, description in {
        400: "Invalid request or unsupported parameter",
        401: "Missing or invalid API key",
        404: "Model not found",
        413: "Request body too large",
        422: "Prompt does not fit the model, or no model named and no default model",
        502: "The generation engine is unreachable or failed",
        503: "Every generation slot is taken and the queue is full (see Retry-After)",
        504: "The generation engine timed out",
    }.items()
}

COMPLETION_200: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/json": {}, "text/event-stream": {}},
        "description": "JSON, or Server-Sent Events with stream",
    }
}

router = APIRouter(
    prefix="/v1", tags=["openai"], route_class=OpenAIRoute, responses=OPENAI_ERROR_RESPONSES
)


class UnsupportedParameter(ServiceError):
    """A request parameter, or parameter value, that this server does not implement."""

    status_code = 400

    def __init__(self, detail: str, param: str) -> None:
        super().__init__(detail)
        self.param = param


class ChatMessage(BaseModel):
    """A chat message; content is text or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields that chat and text completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = OWNER


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/models", response_model=ModelList, summary="List the models (OpenAI format)")
async def list_models(registry: RegistryDep, engine: EngineDep) -> ModelList | Response:
    if engine is not None:
        return await engine.forward("GET", "models")
    entries = await run_in_threadpool(registry.list_models)
    return ModelList(data=[ModelCard(id=entry.id, created=entry.created) for entry in entries])


@router.get("/models/{model_id:path}", response_model=ModelCard, summary="Describe one model")
async def retrieve_model(
    model_id: str, registry: RegistryDep, engine: EngineDep
) -> ModelCard | Response:
    if engine is not None:
        return await engine.retrieve_model(model_id)
    entry = await run_in_threadpool(registry.resolve, model_id)
    return ModelCard(id=entry.id, created=entry.created)


@router.post(
    "/chat/completions", summary="Chat completion (OpenAI format)", responses=COMPLETION_200
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    registry: RegistryDep,
    metrics: MetricsDep,
    engine: EngineDep,
) -> Response:
    if engine is not None:
        return await engine.forward("POST", "chat/completions", await request.json())
    _reject_unsupported(body)
    _reject_set(body, ("top_logprobs", "tools", "tool_choice"))
    if body.response_format not in (None, {"type": "text"}):
        raise UnsupportedParameter(
            "response_format other than {'type': 'text'} is not supported", "response_format"
        )
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = _sampling_params(body, max_tokens, request.app.state.settings)
    messages = [_text_message(message, index) for index, message in enumerate(body.messages)]
    prepared = await prepare_generation(
        registry,
        body.model,
        None,
        messages,
        params,
        fit_context=max_tokens is None,
        slots=request.app.state.generation_slots,
    )

    completion = _Completion(
        "chatcmpl", "chat.completion", "chat.completion.chunk", prepared.loaded.id
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = generation_events(prepared, metrics, request)
        chunks = _chat_chunks(completion, events, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream")

    result = await collect_generation(prepared, request, metrics)
    if result.finish_reason == FINISH_CANCELLED:
        return client_gone_response()
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": result.text},
        "finish_reason": result.finish_reason,
        "logprobs": None,
    }
    return JSONResponse(completion.body([choice], result.usage()))


@router.post("/completions", summary="Text completion (OpenAI format)", responses=COMPLETION_200)
async def completions(
    body: CompletionRequest,
    request: Request,
    registry: RegistryDep,
    metrics: MetricsDep,
    engine: EngineDep,
) -> Response:
    if engine is not None:
        return await engine.forward("POST", "completions", await request.json())
    _reject_unsupported(body)
    _reject_set(body, ("suffix",))
    if body.echo:
        raise UnsupportedParameter("echo is not supported", "echo")
    if body.best_of not in (None, 1):
        raise UnsupportedParameter(f"best_of must be 1 or unset, got {body.best_of}", "best_of")
    settings: Settings = request.app.state.settings
    default_max_tokens = min(COMPLETIONS_DEFAULT_MAX_TOKENS, settings.max_new_tokens_cap)
    params = _sampling_params(body, body.max_tokens or default_max_tokens, settings)
    prompt = _single_prompt(body.prompt)
    slots = request.app.state.generation_slots
    prepared = await prepare_generation(registry, body.model, prompt, None, params, slots=slots)

    completion = _Completion("cmpl", "text_completion", "text_completion", prepared.loaded.id)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = generation_events(prepared, metrics, request)
        chunks = _text_chunks(completion, events, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream")

    result = await collect_generation(prepared, request, metrics)
    if result.finish_reason == FINISH_CANCELLED:
        return client_gone_response()
    choice = {
        "index": 0,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "logprobs": None,
    }
    return JSONResponse(completion.body([choice], result.usage()))


class _Completion:
    """Id, object type, creation time and model shared by a response and all its chunks."""

    def __init__(self, id_prefix: str, object_type: str, chunk_object: str, model: str) -> None:
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.object = object_type
        self.chunk_object = chunk_object
        self.created = int(time.time())
        self.model = model

    def body(self, choices: list[dict], usage: dict | None, **extra: Any) -> dict:
        body = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        if usage is not None:
            body["usage"] = usage
        return body


async def _chat_chunks(
    completion: _Completion,
    events: AsyncIterator[TextDelta | GenerationResult],
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason: str | None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return _chunk(completion, [choice], include_usage)

    yield chunk({"role": "assistant", "content": ""}, None)
    async for piece in _stream(completion, events, include_usage):
        if isinstance(piece, str):
            yield piece
        elif isinstance(piece, TextDelta):
            yield chunk({"content": piece.text}, None)
        else:
            yield chunk({}, piece.finish_reason)


async def _text_chunks(
    completion: _Completion,
    events: AsyncIterator[TextDelta | GenerationResult],
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(text: str, finish_reason: str | None) -> str:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return _chunk(completion, [choice], include_usage)

    async for piece in _stream(completion, events, include_usage):
        if isinstance(piece, str):
            yield piece
        elif isinstance(piece, TextDelta):
            yield chunk(piece.text, None)
        else:
            yield chunk("", piece.finish_reason)


async def _stream(
    completion: _Completion,
    events: AsyncIterator[TextDelta | GenerationResult],
    include_usage: bool,
) -> AsyncIterator[TextDelta | GenerationResult | str]:
    """Yield text deltas, then the result; then the usage chunk and [DONE] as ready SSE text.

    An error after the stream has started becomes a `data: {"error": ...}` event, as
    OpenAI-compatible servers send it.
    """
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                yield event
                continue
            if event.finish_reason == FINISH_CANCELLED:
                return
            yield event
            if include_usage:
                yield sse_event(completion.body([], event.usage(), object=completion.chunk_object))
        yield sse_event("[DONE]")
    except Exception as error:
        logger.exception("streamed completion with model %s failed", completion.model)
        body = openai_error(500, f"generation failed: {error}").body.decode()
        yield f"data: {body}\n\n"


def _chunk(completion: _Completion, choices: list[dict], include_usage: bool) -> str:
    # With include_usage, OpenAI sends "usage": null on every chunk but the last.
    body = completion.body(choices, None, object=completion.chunk_object)
    if include_usage:
        body["usage"] = None
    return sse_event(body)


def _sampling_params(
    body: SamplingFields, max_tokens: int | None, settings: Settings
) -> SamplingParams:
    if body.n != 1:
        raise UnsupportedParameter(
            f"n must be 1: this server returns one choice per request, got n={body.n}", "n"
        )
    if max_tokens is None:
        max_tokens = settings.max_new_tokens_cap
    check_max_new_tokens(max_tokens, settings, "max_tokens")
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=stop_strings(body.stop, "stop"),
    )


def _reject_unsupported(body: SamplingFields) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value not in (None, 0, 0.0):
            raise UnsupportedParameter(
                f"{name} is not supported: leave it unset or 0, got {value}", name
            )
    if body.logit_bias:
        raise UnsupportedParameter("logit_bias is not supported", "logit_bias")
    if body.logprobs not in (None, False, 0):
        raise UnsupportedParameter("logprobs are not supported", "logprobs")


def _reject_set(body: BaseModel, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(body, name) is not None:
            raise UnsupportedParameter(f"{name} is not supported by this server", name)


def _text_message(message: ChatMessage, index: int) -> dict[str, str]:
    """Flatten a message to {"role", "content"}; content parts must all be text."""
    content = message.content
    if content is None:
        return {"role": message.role, "content": ""}
    if isinstance(content, str):
        return {"role": message.role, "content": content}

    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise UnsupportedParameter(
                f"messages[{index}].content has a part of type {part.get('type')!r}: "
                "only text parts are supported",
                f"messages.{index}.content",
            )
        texts.append(part["text"])
    return {"role": message.role, "content": "".join(texts)}


def _single_prompt(prompt: str | list[str] | list[int] | list[list[int]]) -> str | list[int]:
    """Return the one prompt as text or token ids; several prompts are rejected."""
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(item, int) for item in prompt):
        return list(prompt)
    if len(prompt) == 1:
        return prompt[0]
    raise invalid_field("prompt", f"send one prompt per request, got a batch of {len(prompt)}")


def _describe_validation_error(error: RequestValidationError) -> tuple[str, str | None]:
    """Return (message, param) for the first validation error, param as a dotted path."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    if param and param not in message:
        message = f"invalid value for '{param}': {message}"
    return message, param
