"""Read JSONL training and evaluation examples and render their prompts with a chat template.

Each line of a data file is one JSON object in one of two forms:

    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "completion": "..."}

In the messages form, all messages but the last are the prompt and the last one, which
must come from the assistant, is the completion. A prompt/completion line becomes a
single user message. Training and evaluation both render the prompt through
`render_prompt`, so the model is scored on exactly the prompt text it was trained on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "FURINA_DATA_DIR"


@dataclass(frozen=True)
class Example:
    """One chat example: the prompt messages and the assistant's reference completion."""

    prompt_messages: list[dict[str, str]]
    completion: str


def default_data_dir() -> Path:
    """Return the data directory: $FURINA_DATA_DIR if set, else ./data."""
    return Path(os.environ.get(DATA_DIR_ENV) or "data")


def read_jsonl_examples(path: str | os.PathLike[str]) -> list[Example]:
    """Parse a JSONL file into examples, skipping blank lines.

    Raises ValueError naming the file and the 1-based line number of the first bad line,
    and FileNotFoundError if the file does not exist.
    """
    file_path = Path(path)
    if not file_path.is_file():
        raise FileNotFoundError(f"data file not found: {file_path}")

    examples = []
    with file_path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                examples.append(parse_example(json.loads(line)))
            except ValueError as error:
                # json.JSONDecodeError is a ValueError subclass.
                raise ValueError(f"{file_path}:{line_number}: {error}") from error

    if not examples:
        raise ValueError(f"no examples in {file_path}: expected one JSON object per line")
    return examples


def parse_example(record: Any) -> Example:
    """Convert one decoded JSON line into an Example, raising ValueError on a bad record."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")

    has_messages = "messages" in record
    has_prompt = "prompt" in record or "completion" in record
    if has_messages and has_prompt:
        raise ValueError("found both 'messages' and 'prompt'/'completion': use one form per line")
    if has_messages:
        return _parse_messages(record["messages"])
    if has_prompt:
        return _parse_prompt_completion(record)
    raise ValueError(f"missing 'messages' or 'prompt'/'completion' key, got keys {sorted(record)}")


def _parse_messages(messages: Any) -> Example:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("'messages' must be a list of at least 2 messages (prompt and completion)")

    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} must be an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"message {index} must have a string {key!r}")

    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"the last message must have role 'assistant', got {messages[-1]['role']!r}"
        )
    prompt_messages = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    return Example(prompt_messages=prompt_messages, completion=messages[-1]["content"])


def _parse_prompt_completion(record: dict[str, Any]) -> Example:
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"'prompt' and 'completion' must both be strings, {key!r} is not")
    return Example(
        prompt_messages=[{"role": "user", "content": record["prompt"]}],
        completion=record["completion"],
    )


def render_prompt(tokenizer, example: Example) -> str:
    """Render the prompt messages with the tokenizer's chat template and the assistant header.

    The text already contains the template's special tokens, so tokenize it with
    add_special_tokens=False.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat template: use a checkpoint "
            "prepared with `furina prepare-base`, which saves the template"
        )
    return tokenizer.apply_chat_template(
        example.prompt_messages, tokenize=False, add_generation_prompt=True
    )
