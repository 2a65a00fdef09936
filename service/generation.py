"""Text generation for the service: prompt encoding, a token-by-token decode loop, stop handling.

The decode loop is written out instead of calling `model.generate`, so that every
step can check a stop flag (set when the client disconnects) and match stop strings on
the decoded text. It samples with a per-request torch.Generator, so a seed never
touches the global RNG that other requests share, and it times the first token. With
temperature 0 it runs the same forward calls as `model.generate(do_sample=False)`: one
prefill over the prompt, then one cached step per token, keeping only the last position's
logits, so greedy output is token for token identical (tests/service/test_generate.py
checks this).

Callers hold the model's lock while iterating: a Hugging Face model with a KV cache is
not safe to run from two threads at once.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
# The client disconnected, so generation ended early and the result is not sent.
FINISH_CANCELLED = "cancelled"


class PromptError(ValueError):
    """A prompt or message list that cannot be encoded for this model."""


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request. temperature 0 means greedy; top_k 0 means no limit."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 or more, got {self.top_k}")
        if any(not stop for stop in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass
class TextDelta:
    """Newly decoded text, safe to show: it can no longer become part of a stop string."""

    text: str


@dataclass
class GenerationResult:
    """Outcome of one generation. Times are in seconds from the start of the prefill."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float
    total: float
    token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """Completion tokens per second of total time (prefill included)."""
        return self.completion_tokens / self.total if self.total > 0 else 0.0

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def timings(self) -> dict[str, float]:
        return {
            "time_to_first_token": self.time_to_first_token,
            "total": self.total,
            "tokens_per_second": self.tokens_per_second,
        }


def encode_prompt(
    tokenizer, prompt: str | None = None, messages: list[dict] | None = None
) -> list[int]:
    """Tokenize a plain prompt, or render chat messages with the tokenizer's chat template.

    A plain prompt gets the tokenizer's special tokens (a BOS token where the tokenizer
    adds one), as `tokenizer(prompt)` gives them. A rendered chat template already
    contains its special tokens, so none are added to it.
    """
    if (prompt is None) == (messages is None):
        raise PromptError("send exactly one of prompt and messages")
    if messages is None:
        return tokenizer(prompt).input_ids

    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            "this model's tokenizer has no chat template, so messages cannot be rendered: "
            "send a plain prompt instead"
        )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def check_context_length(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """Reject requests that do not fit the model's position embeddings."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if prompt_tokens == 0:
        raise PromptError("the prompt is empty: send at least one token of text")
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise PromptError(
            f"the prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}, "
            f"{prompt_tokens + max_new_tokens} in all, but this model's context length is "
            f"{limit}: shorten the prompt or lower max_new_tokens"
        )


def stop_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """End-of-sequence ids, as `generate` reads them: the generation config, else the tokenizer."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(token) for token in eos}


def stream_generation(
    model: nn.Module,
    tokenizer,
    input_ids: list[int],
    params: SamplingParams,
    stop_event: threading.Event | None = None,
) -> Iterator[TextDelta | GenerationResult]:
    """Generate from input_ids, yielding TextDelta events and finally one GenerationResult.

    Stops at an end-of-sequence token or a stop string (finish_reason "stop"), after
    max_new_tokens tokens ("length"), or when stop_event is set ("cancelled"). The final
    text excludes the stop string and special tokens; completion_tokens counts every
    generated token, the end-of-sequence token included.
    """
    with torch.inference_mode():
        yield from _decode(model, tokenizer, input_ids, params, stop_event or threading.Event())


def run_generation(
    model: nn.Module,
    tokenizer,
    input_ids: list[int],
    params: SamplingParams,
    stop_event: threading.Event | None = None,
) -> GenerationResult:
    """Generate to the end and return only the result."""
    for event in stream_generation(model, tokenizer, input_ids, params, stop_event):
        if isinstance(event, GenerationResult):
            return event
    raise AssertionError("stream_generation ended without a GenerationResult")


def _decode(
    model: nn.Module,
    tokenizer,
    input_ids: list[int],
    params: SamplingParams,
    stop_event: threading.Event,
) -> Iterator[TextDelta | GenerationResult]:
    device = next(model.parameters()).device
    generator = _sampling_generator(params.seed, device)
    eos_ids = stop_token_ids(model, tokenizer)
    text_stream = _IncrementalText(tokenizer, params.stop)
    cache = DynamicCache(config=model.config)
    cache_argument = _cache_keyword(model)
    generated: list[int] = []
    finish_reason = FINISH_LENGTH
    stopped = False  # by a stop string
    time_to_first_token = 0.0

    started = time.perf_counter()
    step_input = torch.tensor([input_ids], device=device)  # [1, T]
    while len(generated) < params.max_new_tokens:
        if stop_event.is_set():
            finish_reason = FINISH_CANCELLED
            break

        output = model(
            input_ids=step_input, use_cache=True, logits_to_keep=1, **{cache_argument: cache}
        )
        token = _next_token(output.logits[0, -1], params, generator)
        generated.append(token)
        if len(generated) == 1:
            time_to_first_token = time.perf_counter() - started

        if token in eos_ids:
            finish_reason = FINISH_STOP
            break
        delta, stopped = text_stream.push(generated)
        if delta:
            yield TextDelta(delta)
        if stopped:
            finish_reason = FINISH_STOP
            break
        step_input = torch.tensor([[token]], device=device)  # [1, 1]

    total = time.perf_counter() - started
    if not stopped:
        tail = text_stream.finish(generated)
        if tail:
            yield TextDelta(tail)
    yield GenerationResult(
        text=text_stream.text,
        finish_reason=finish_reason,
        prompt_tokens=len(input_ids),
        completion_tokens=len(generated),
        time_to_first_token=time_to_first_token,
        total=total,
        token_ids=generated,
    )


def _cache_keyword(model: nn.Module) -> str:
    """Return the name of the forward argument that takes the KV cache.

    transformers 5.25 calls it `cache` and warns on every call that passes the older
    name `past_key_values`, so the name the model's forward declares is used.
    """
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _sampling_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a fresh non-deterministic seed per request
    else:
        generator.manual_seed(seed)
    return generator


def _next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from the last position's logits [V]."""
    if params.temperature == 0:
        return int(logits.argmax())

    scores = logits.float() / params.temperature
    if params.top_k > 0:
        scores = _keep_top_k(scores, params.top_k)
    if params.top_p < 1:
        scores = _keep_top_p(scores, params.top_p)
    probabilities = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def _keep_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, scores.shape[-1])
    threshold = torch.topk(scores, top_k).values[-1]
    return scores.masked_fill(scores < threshold, float("-inf"))


def _keep_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least top_p."""
    sorted_scores, order = torch.sort(scores, descending=True)
    cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
    # A token is dropped when the tokens before it already reach top_p; the first always stays.
    drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


class _IncrementalText:
    """Turn generated token ids into text deltas, holding back what may start a stop string.

    Decoding is incremental, as `Model.decode_token` of Hugging Face's
    text-generation-inference does it. Each step decodes only the tokens after
    `prefix_offset` and compares the result with the decoding of the tokens up to
    `read_offset`, so the cost per token does not grow with the completion. New text
    that ends in "\\ufffd" (a UTF-8 character split across byte-level tokens) waits for
    the next token.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # decoded so far; cut before the stop string once one is found
        self.emitted = 0  # characters of self.text already returned as deltas

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        """Return (new safe text, whether a stop string was found)."""
        searched_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += self._new_text(token_ids, final=False)
        stop_at = self._find_stop(searched_from)
        if stop_at is not None:
            self.text = self.text[:stop_at]
            return self._release(len(self.text)), True
        return self._release(len(self.text) - self._held_back()), False

    def finish(self, token_ids: list[int]) -> str:
        """Release the rest once generation ended without a stop string."""
        self.text += self._new_text(token_ids, final=True)
        return self._release(len(self.text))

    def _new_text(self, token_ids: list[int], final: bool) -> str:
        prefix_text = self._decode(token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(token_ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text):
            return ""
        if full_text.endswith("\ufffd") and not final:
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return full_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _find_stop(self, searched_from: int) -> int | None:
        # Earlier text was searched before: only a match that ends in new text is new.
        matches = [self.text.find(stop, searched_from) for stop in self.stop]
        found = [index for index in matches if index >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest end of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _release(self, safe_end: int) -> str:
        if safe_end <= self.emitted:
            return ""
        delta = self.text[self.emitted : safe_end]
        self.emitted = safe_end
        return delta
