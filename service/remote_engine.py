"""Client of an OpenAI-compatible engine, used when settings.generation_backend is "openai".

The engine is any server with the OpenAI API under engine_url: vLLM in the docker
compose `gpu` profile, or another `furina serve`. The routers forward to it:

- /v1/chat/completions, /v1/completions and /v1/models go through unchanged; a streamed
  response is relayed chunk by chunk as it arrives.
- /generate becomes a streamed /v1/completions (prompt) or /v1/chat/completions
  (messages) request, answered in the /generate shape. Its timings are measured here,
  from sending the request to the engine, so they include the network and the
  engine's queue, unlike the local backend's, which start at the prefill.

Engine failures: a connection error, a 5xx or a 401/403 (a wrong FURINA_ENGINE_API_KEY)
becomes 502, and a timeout becomes 504, each naming the engine URL. Other 4xx responses
describe the client's request (an unknown model, an invalid parameter), so their status
and message are passed on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

import httpx
from fastapi import Depends, Request, Response
from fastapi.responses import StreamingResponse

from service.errors import ServiceError
from service.generation import GenerationResult, SamplingParams, TextDelta
from service.metrics import ServiceMetrics
from service.settings import Settings

logger = logging.getLogger(__name__)

# /ready waits at most this long for the engine's GET /v1/models.
READY_TIMEOUT_SECONDS = 5.0
FINISH_REASONS = ("stop", "length")


class EngineError(ServiceError):
    """The engine is unreachable, failed, or sent a response this service cannot use."""

    status_code = 502


class EngineTimeout(EngineError):
    """The engine did not connect or respond within FURINA_ENGINE_TIMEOUT_SECONDS."""

    status_code = 504


class EngineRejected(ServiceError):
    """A 4xx response of the engine about the client's request, passed on with its status."""

    def __init__(self, status_code: int, detail: str, param: str | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.param = param  # the OpenAI error's "param", shown by the OpenAI routes


@dataclass
class RemoteGeneration:
    """An engine stream whose response status was 200: the model id and its unread events."""

    model: str
    events: AsyncIterator[TextDelta | GenerationResult]


class RemoteEngine:
    """An httpx.AsyncClient for the engine at settings.engine_url, with error mapping."""

    def __init__(
        self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.url = str(settings.engine_url).rstrip("/")
        self.default_model = settings.default_model
        headers = {}
        if settings.engine_api_key is not None:
            headers["Authorization"] = f"Bearer {settings.engine_api_key.get_secret_value()}"
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(settings.engine_timeout_seconds),
            transport=transport,
        )
        self._timeout = settings.engine_timeout_seconds

    async def aclose(self) -> None:
        await self._client.aclose()

    async def forward(self, method: str, path: str, body: Any = None) -> Response:
        """Send a request to the engine's path (relative to engine_url) and relay the response.

        A streamed response (to a JSON body with "stream": true) is relayed as it arrives.
        """
        response = await self._send(method, path, body)
        media_type = response.headers.get("content-type")
        if isinstance(body, dict) and body.get("stream"):
            return StreamingResponse(
                self._relay(response, path), status_code=response.status_code, media_type=media_type
            )
        try:
            content = await response.aread()
        except httpx.TransportError as error:
            raise self._transport_error(error, path) from error
        finally:
            await response.aclose()
        return Response(content, status_code=response.status_code, media_type=media_type)

    async def retrieve_model(self, model_id: str) -> Response:
        """Relay the engine's GET /models/{model_id}. Ids with '.' or '..' segments are rejected."""
        if any(part in (".", "..") for part in model_id.split("/")):
            raise EngineRejected(400, f"invalid model id {model_id!r}: it has a '.' or '..' part")
        return await self.forward("GET", f"models/{quote(model_id, safe='/')}")

    async def open_generation(
        self,
        model: str | None,
        prompt: str | None,
        messages: list[dict] | None,
        params: SamplingParams,
        metrics: ServiceMetrics,
    ) -> RemoteGeneration:
        """Start a streamed completion for POST /generate from exactly one of prompt and messages.

        Returns once the engine has responded with 200, so a failure before the first token
        is raised here and becomes an HTTP error, not an error event inside the stream.
        """
        model = model or self.default_model or await self.first_model_id()
        path, payload = completion_payload(model, prompt, messages, params)
        started = time.perf_counter()
        response = await self._send("POST", path, payload)
        events = self._generation_events(response, path, model, started, metrics)
        return RemoteGeneration(model=model, events=events)

    async def first_model_id(self) -> str:
        """Return the id of the first model in the engine's GET /v1/models."""
        response = await self.forward("GET", "models")
        try:
            return json.loads(response.body)["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise EngineError(
                f"engine {self.url} lists no model in GET /models: name one in the "
                "request's 'model' field, or set FURINA_DEFAULT_MODEL"
            ) from error

    async def check(self) -> None:
        """Raise EngineError unless the engine responds to GET /models with 200 (for /ready).

        Logs nothing, because /ready logs the failed checks itself.
        """
        try:
            response = await self._client.get("models", timeout=READY_TIMEOUT_SECONDS)
        except httpx.TransportError as error:
            raise self._transport_error(error, "models", log=False) from error
        if response.status_code != 200:
            raise EngineError(
                f"engine {self.url} returned {response.status_code} for GET /models"
            )

    async def _send(self, method: str, path: str, body: Any) -> httpx.Response:
        """Send a request and return the open response once its status is below 400."""
        request = self._client.build_request(method, path, json=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as error:
            raise self._transport_error(error, path) from error
        if response.status_code < 400:
            return response

        try:
            await response.aread()
        except httpx.TransportError as error:
            raise self._transport_error(error, path) from error
        finally:
            await response.aclose()
        raise self._status_error(response, path)

    def _transport_error(
        self, error: httpx.TransportError, path: str, log: bool = True
    ) -> EngineError:
        reason = str(error) or type(error).__name__
        if isinstance(error, httpx.TimeoutException):
            mapped: EngineError = EngineTimeout(
                f"engine {self.url} timed out on {path} after {self._timeout} s: raise "
                "FURINA_ENGINE_TIMEOUT_SECONDS if the engine is busy"
            )
        elif isinstance(error, httpx.ConnectError):
            mapped = EngineError(f"engine {self.url} is unreachable: {reason}")
        else:
            mapped = EngineError(f"connection to engine {self.url} failed during {path}: {reason}")
        if log:
            logger.warning("%s", mapped.detail)
        return mapped

    def _status_error(self, response: httpx.Response, path: str) -> ServiceError:
        status = response.status_code
        message, param = _error_message(response)
        if status in (401, 403):
            error: ServiceError = EngineError(
                f"engine {self.url} rejected this service's credentials with {status}: "
                f"{message}. Check FURINA_ENGINE_API_KEY"
            )
        elif status < 500:
            return EngineRejected(status, message, param)
        else:
            error = EngineError(f"engine {self.url} failed on {path} with {status}: {message}")
        logger.warning("%s", error.detail)
        return error

    async def _relay(self, response: httpx.Response, path: str) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        except httpx.TransportError as error:
            # The status line is already sent: end the stream with an OpenAI error event.
            detail = self._transport_error(error, path).detail
            body = {"error": {"message": detail, "type": "server_error", "param": None}}
            yield f"data: {json.dumps(body)}\n\n".encode()
        finally:
            await response.aclose()

    async def _generation_events(
        self,
        response: httpx.Response,
        path: str,
        model: str,
        started: float,
        metrics: ServiceMetrics,
    ) -> AsyncIterator[TextDelta | GenerationResult]:
        """Yield the text of each chunk, then one GenerationResult from the final chunks."""
        parts: list[str] = []
        first_token_at: float | None = None
        finish_reason = usage = None
        try:
            async for chunk in _sse_chunks(response):
                if "error" in chunk:
                    raise EngineError(f"engine {self.url} failed during {path}: {chunk['error']}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    text = _choice_text(choice)
                    finish_reason = choice.get("finish_reason") or finish_reason
                    if text:
                        first_token_at = first_token_at or time.perf_counter()
                        parts.append(text)
                        yield TextDelta(text)
        except httpx.TransportError as error:
            raise self._transport_error(error, path) from error
        finally:
            await response.aclose()

        total = time.perf_counter() - started
        result = self._result(path, parts, finish_reason, usage, first_token_at, started, total)
        _record(result, model, metrics)
        yield result

    def _result(
        self,
        path: str,
        parts: list[str],
        finish_reason: str | None,
        usage: dict | None,
        first_token_at: float | None,
        started: float,
        total: float,
    ) -> GenerationResult:
        if finish_reason not in FINISH_REASONS:
            raise EngineError(
                f"engine {self.url} ended {path} with finish_reason {finish_reason!r}, "
                f"expected one of {FINISH_REASONS}"
            )
        if not usage:
            raise EngineError(
                f"engine {self.url} sent no usage for {path}: it must support "
                "stream_options.include_usage"
            )
        return GenerationResult(
            text="".join(parts),
            finish_reason=finish_reason,
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            # With no text at all, the first token is the last one.
            time_to_first_token=total if first_token_at is None else first_token_at - started,
            total=total,
        )


def completion_payload(
    model: str, prompt: str | None, messages: list[dict] | None, params: SamplingParams
) -> tuple[str, dict[str, Any]]:
    """Build the engine path and the streamed OpenAI request body for one /generate request."""
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # top_k is an extension of vLLM and of this service, which plain OpenAI servers reject.
    if params.top_k > 0:
        payload["top_k"] = params.top_k
    if params.seed is not None:
        payload["seed"] = params.seed
    if params.stop:
        payload["stop"] = list(params.stop)

    if messages is not None:
        return "chat/completions", {**payload, "messages": messages}
    return "completions", {**payload, "prompt": prompt}


def get_engine(request: Request) -> RemoteEngine | None:
    """Return the app's RemoteEngine, or None with the local backend."""
    return getattr(request.app.state, "engine", None)


EngineDep = Annotated[RemoteEngine | None, Depends(get_engine)]


def create_engine(settings: Settings) -> RemoteEngine | None:
    """Return a RemoteEngine for the "openai" backend, or None for "local"."""
    if settings.generation_backend != "openai":
        return None
    logger.info("generation backend: OpenAI-compatible engine at %s", settings.engine_url)
    return RemoteEngine(settings)


async def _sse_chunks(response: httpx.Response) -> AsyncIterator[dict]:
    """Yield the JSON object of each `data:` line until [DONE]."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except ValueError as error:
            raise EngineError(f"engine sent an event that is not JSON: {data[:200]!r}") from error


def _choice_text(choice: dict) -> str:
    """Return the new text of a streamed choice: `text` of a completion, `delta` of a chat."""
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


def _error_message(response: httpx.Response) -> tuple[str, str | None]:
    """Return (message, param) of an error body: OpenAI's {"error"} or FastAPI's {"detail"}."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase, None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message")), error.get("param")
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"]), None
    return json.dumps(body)[:500], None


def _record(result: GenerationResult, model: str, metrics: ServiceMetrics) -> None:
    metrics.generated_tokens.inc(result.completion_tokens)
    logger.info(
        "engine generated %d tokens with model %s from %d prompt tokens: finish_reason %s, "
        "time to first token %.3f s, total %.3f s, %.1f tokens/s",
        result.completion_tokens,
        model,
        result.prompt_tokens,
        result.finish_reason,
        result.time_to_first_token,
        result.total,
        result.tokens_per_second,
    )
