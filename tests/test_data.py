"""JSONL example parsing, its line-numbered errors, and chat-template prompt rendering."""

import json

import pytest

from furina.data import Example, default_data_dir, read_jsonl_examples, render_prompt
from furina.synthetic import byte_level_tokenizer


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_messages_line_splits_prompt_and_answer(tmp_path):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(record)])

    examples = read_jsonl_examples(path)

    assert examples == [
        Example(
            prompt_messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
            ],
            completion="4",
        )
    ]


def test_prompt_completion_line_becomes_user_message(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps({"prompt": "hi", "completion": "yo"})])

    examples = read_jsonl_examples(path)

    assert examples == [
        Example(prompt_messages=[{"role": "user", "content": "hi"}], completion="yo")
    ]


def test_blank_lines_skipped_and_order_kept(tmp_path):
    lines = [
        json.dumps({"prompt": "a", "completion": "1"}),
        "",
        "   ",
        json.dumps({"prompt": "b", "completion": "2"}),
    ]
    path = write_lines(tmp_path / "data.jsonl", lines)

    examples = read_jsonl_examples(path)

    assert [example.completion for example in examples] == ["1", "2"]


def test_unicode_content_round_trips(tmp_path):
    record = {"prompt": "Übersetze: café", "completion": "カフェ"}
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(record, ensure_ascii=False)])

    (example,) = read_jsonl_examples(path)

    assert example.prompt_messages[0]["content"] == "Übersetze: café"
    assert example.completion == "カフェ"


GOOD_LINE = json.dumps({"prompt": "a", "completion": "b"})

BAD_LINES = [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"text"', "expected a JSON object, got str"),
    ("{}", "missing 'messages' or 'prompt'/'completion'"),
    (json.dumps({"prompt": "a"}), "'completion' is not"),
    (json.dumps({"completion": "b"}), "'prompt' is not"),
    (json.dumps({"prompt": 1, "completion": "b"}), "'prompt' is not"),
    (json.dumps({"prompt": "a", "completion": None}), "'completion' is not"),
    (
        json.dumps({"prompt": "a", "completion": "b", "messages": []}),
        "found both 'messages' and 'prompt'/'completion'",
    ),
    (json.dumps({"messages": "hi"}), "must be a list of at least 2 messages"),
    (
        json.dumps({"messages": [{"role": "assistant", "content": "x"}]}),
        "must be a list of at least 2 messages",
    ),
    (json.dumps({"messages": ["hi", "there"]}), "message 0 must be an object, got str"),
    (
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}),
        "message 0 must have a string 'content'",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"content": "y"}]}),
        "message 1 must have a string 'role'",
    ),
    (
        json.dumps(
            {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}
        ),
        "the last message must have role 'assistant', got 'user'",
    ),
]


@pytest.mark.parametrize(("bad_line", "message"), BAD_LINES)
def test_bad_line_error_names_file_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "data.jsonl", [GOOD_LINE, "", bad_line, GOOD_LINE])

    with pytest.raises(ValueError) as raised:
        read_jsonl_examples(path)

    assert str(raised.value).startswith(f"{path}:3: ")
    assert message in str(raised.value)


def test_empty_file_rejected(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", ["", "  "])

    with pytest.raises(ValueError, match="no examples in"):
        read_jsonl_examples(path)


def test_missing_file_rejected(tmp_path):
    path = tmp_path / "absent.jsonl"

    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_jsonl_examples(path)


def test_render_prompt_uses_chat_template():
    tokenizer = byte_level_tokenizer()
    example = Example(
        prompt_messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
        ],
        completion="4",
    )

    prompt = render_prompt(tokenizer, example)

    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_prompt_excludes_completion():
    tokenizer = byte_level_tokenizer()
    example = Example(prompt_messages=[{"role": "user", "content": "q"}], completion="secret")

    prompt = render_prompt(tokenizer, example)

    assert "secret" not in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_render_prompt_requires_chat_template():
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = None
    example = Example(prompt_messages=[{"role": "user", "content": "q"}], completion="a")

    with pytest.raises(ValueError, match="has no chat template"):
        render_prompt(tokenizer, example)


def test_default_data_dir_reads_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FURINA_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path

    monkeypatch.delenv("FURINA_DATA_DIR")
    assert str(default_data_dir()) == "data"
