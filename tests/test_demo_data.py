"""Demo dataset: deterministic, disjoint splits, completions correct by construction."""

import datetime
import re

import pytest

from furina.cli import main
from furina.data import read_jsonl_examples
from furina.demo_data import (
    DATE_STYLES,
    FIRST_DATE,
    LAST_DATE,
    format_date,
    generate_demo_records,
    write_demo_data,
)

# strptime formats that parse each style back. %B and %b match English month names in the
# default C locale.
PARSE_FORMATS = {
    "month_day_year": "%B %d, %Y",
    "day_month_year": "%d %B %Y",
    "abbreviated_month_day_year": "%b %d, %Y",
}
PROMPT_PATTERN = re.compile(r"^Convert to ISO 8601: (.+)$")


def parse_prompt_date(prompt: str) -> datetime.date:
    """Parse the date in a demo prompt with any of the known styles."""
    text = PROMPT_PATTERN.match(prompt).group(1)
    for parse_format in PARSE_FORMATS.values():
        try:
            return datetime.datetime.strptime(text, parse_format).date()
        except ValueError:
            continue
    raise AssertionError(f"prompt date {text!r} matches no known style")


def record_pair(record):
    user, assistant = record["messages"]
    return user["content"], assistant["content"]


def test_same_seed_same_records():
    first = generate_demo_records(50, 10, seed=3)
    second = generate_demo_records(50, 10, seed=3)

    assert first == second


def test_other_seed_other_records():
    first = generate_demo_records(50, 10, seed=3)
    second = generate_demo_records(50, 10, seed=4)

    assert first != second


def test_written_files_are_deterministic(tmp_path):
    first = write_demo_data(tmp_path / "a", train_size=40, eval_size=10, seed=1)
    second = write_demo_data(tmp_path / "b", train_size=40, eval_size=10, seed=1)

    assert first.train.read_bytes() == second.train.read_bytes()
    assert first.eval.read_bytes() == second.eval.read_bytes()


def test_splits_have_requested_sizes():
    train, evaluation = generate_demo_records(300, 40, seed=0)

    assert len(train) == 300
    assert len(evaluation) == 40


def test_splits_share_no_date():
    train, evaluation = generate_demo_records(2000, 200, seed=0)

    train_answers = {record_pair(record)[1] for record in train}
    eval_answers = {record_pair(record)[1] for record in evaluation}
    assert len(train_answers) == 2000
    assert len(eval_answers) == 200
    assert train_answers.isdisjoint(eval_answers)


def test_answers_match_prompt_dates():
    train, evaluation = generate_demo_records(500, 100, seed=0)

    for record in train + evaluation:
        prompt, answer = record_pair(record)
        date = parse_prompt_date(prompt)
        assert answer == date.isoformat(), prompt
        assert FIRST_DATE <= date <= LAST_DATE


def test_answers_are_iso_8601():
    train, _ = generate_demo_records(200, 10, seed=0)

    for record in train:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", record_pair(record)[1])


def test_all_styles_used():
    train, _ = generate_demo_records(300, 10, seed=0)

    styles_seen = set()
    for record in train:
        prompt, _ = record_pair(record)
        text = PROMPT_PATTERN.match(prompt).group(1)
        for style, parse_format in PARSE_FORMATS.items():
            try:
                datetime.datetime.strptime(text, parse_format)
                styles_seen.add(style)
            except ValueError:
                pass
    assert styles_seen == set(DATE_STYLES)


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("month_day_year", "March 5, 2021"),
        ("day_month_year", "5 March 2021"),
        ("abbreviated_month_day_year", "Mar 5, 2021"),
    ],
)
def test_format_date_styles(style, expected):
    assert format_date(datetime.date(2021, 3, 5), style) == expected


def test_format_date_rejects_unknown_style():
    with pytest.raises(ValueError, match="unknown date style 'iso'"):
        format_date(datetime.date(2021, 3, 5), "iso")


@pytest.mark.parametrize(("train_size", "eval_size"), [(0, 10), (10, 0), (-1, 5)])
def test_sizes_below_one_rejected(train_size, eval_size):
    with pytest.raises(ValueError, match="must be at least 1"):
        generate_demo_records(train_size, eval_size)


def test_more_examples_than_dates_rejected():
    with pytest.raises(ValueError, match="must be at most 36525"):
        generate_demo_records(36000, 1000)


def test_files_load_as_examples(tmp_path):
    files = write_demo_data(tmp_path, train_size=20, eval_size=5, seed=0)

    train = read_jsonl_examples(files.train)
    evaluation = read_jsonl_examples(files.eval)

    assert len(train) == 20
    assert len(evaluation) == 5
    assert train[0].prompt_messages[0]["role"] == "user"
    assert train[0].prompt_messages[0]["content"].startswith("Convert to ISO 8601: ")


def test_cli_writes_under_data_dir(tmp_path, capsys):
    exit_code = main(
        ["demo-data", "--data-dir", str(tmp_path), "--train-size", "12", "--eval-size", "4"]
    )

    demo_dir = tmp_path / "datasets" / "demo"
    assert exit_code == 0
    assert len(read_jsonl_examples(demo_dir / "train.jsonl")) == 12
    assert len(read_jsonl_examples(demo_dir / "eval.jsonl")) == 4
    assert str(demo_dir / "train.jsonl") in capsys.readouterr().out


def test_cli_output_overrides_data_dir(tmp_path):
    output = tmp_path / "custom"

    exit_code = main(
        [
            "demo-data",
            "--data-dir",
            str(tmp_path / "unused"),
            "--output",
            str(output),
            "--train-size",
            "3",
            "--eval-size",
            "2",
        ]
    )

    assert exit_code == 0
    assert (output / "train.jsonl").is_file()
    assert not (tmp_path / "unused").exists()


def test_cli_uses_environment_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FURINA_DATA_DIR", str(tmp_path))

    exit_code = main(["demo-data", "--train-size", "3", "--eval-size", "2"])

    assert exit_code == 0
    assert (tmp_path / "datasets" / "demo" / "eval.jsonl").is_file()
