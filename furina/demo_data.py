"""Generate the demo task: convert an English date to ISO 8601 (YYYY-MM-DD).

Why it makes a good demo for adapter training on a small CPU budget:

- The target is short (10 characters) and exactly checkable, so greedy exact match is a
  clear score with no judge model.
- SmolLM2-135M-Instruct does not produce the format out of the box: it explains how to
  convert the date, or drifts into unrelated text. Greedy exact match was 0/200 on the
  default eval split (seed 0, 32 new tokens).
- The mapping is small and regular (12 month names, zero-padded day, copied year). A
  PEFT LoRA (r=16 on all 7 projections, lr 2e-4, batch 8) reached 100/100 on the first
  100 eval examples after 150 steps, with the training loss below 0.04 by step 20.
- Prompt plus completion are 58 to 60 tokens with the SmolLM2 chat template.

Train and eval dates are drawn without replacement from one pool, so no eval date
appears in the training file, and each date is written in one of several styles.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from furina.data import default_data_dir

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_SIZE = 2000
DEFAULT_EVAL_SIZE = 200
DEFAULT_SEED = 0

PROMPT_TEMPLATE = "Convert to ISO 8601: {date}"
FIRST_DATE = datetime.date(1950, 1, 1)
LAST_DATE = datetime.date(2049, 12, 31)

# English month names, fixed here so the text does not depend on the process locale.
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
DATE_STYLES = ("month_day_year", "day_month_year", "abbreviated_month_day_year")


@dataclass(frozen=True)
class DemoDataFiles:
    """Paths of the written train and eval JSONL files."""

    train: Path
    eval: Path


def format_date(date: datetime.date, style: str) -> str:
    """Write a date in English: "March 5, 2021", "5 March 2021" or "Mar 5, 2021"."""
    month = MONTHS[date.month - 1]
    if style == "month_day_year":
        return f"{month} {date.day}, {date.year}"
    if style == "day_month_year":
        return f"{date.day} {month} {date.year}"
    if style == "abbreviated_month_day_year":
        return f"{month[:3]} {date.day}, {date.year}"
    raise ValueError(f"unknown date style {style!r}, expected one of {DATE_STYLES}")


def demo_record(date: datetime.date, style: str) -> dict:
    """Build one chat-format line: the date in `style` and its ISO 8601 form as the completion."""
    prompt = PROMPT_TEMPLATE.format(date=format_date(date, style))
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": date.isoformat()},
        ]
    }


def generate_demo_records(
    train_size: int, eval_size: int, seed: int = DEFAULT_SEED
) -> tuple[list[dict], list[dict]]:
    """Return (train, eval) records for distinct dates. The same seed gives the same records."""
    if train_size < 1 or eval_size < 1:
        raise ValueError(
            f"train and eval sizes must be at least 1, got {train_size} and {eval_size}"
        )
    day_count = (LAST_DATE - FIRST_DATE).days + 1
    if train_size + eval_size > day_count:
        raise ValueError(
            f"train size + eval size must be at most {day_count} (distinct dates from "
            f"{FIRST_DATE} to {LAST_DATE}), got {train_size + eval_size}"
        )

    rng = random.Random(seed)
    offsets = rng.sample(range(day_count), train_size + eval_size)
    records = []
    for offset in offsets:
        date = FIRST_DATE + datetime.timedelta(days=offset)
        records.append(demo_record(date, rng.choice(DATE_STYLES)))
    return records[:train_size], records[train_size:]


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records one JSON object per line, through a temporary file renamed on success."""
    temporary_path = path.with_name(path.name + ".tmp")
    with temporary_path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(temporary_path, path)


def write_demo_data(
    output_dir: str | os.PathLike[str],
    train_size: int = DEFAULT_TRAIN_SIZE,
    eval_size: int = DEFAULT_EVAL_SIZE,
    seed: int = DEFAULT_SEED,
) -> DemoDataFiles:
    """Write train.jsonl and eval.jsonl into output_dir, replacing existing files."""
    train_records, eval_records = generate_demo_records(train_size, eval_size, seed)

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    files = DemoDataFiles(train=output / "train.jsonl", eval=output / "eval.jsonl")
    write_jsonl(files.train, train_records)
    write_jsonl(files.eval, eval_records)
    logger.info("wrote %s train and %s eval examples to %s", train_size, eval_size, output)
    return files


def add_cli_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-data",
        help="write the date-normalisation demo dataset (train.jsonl, eval.jsonl)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory; the default output is DATA_DIR/datasets/demo "
        "(default: $FURINA_DATA_DIR or ./data)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="output directory (overrides --data-dir)"
    )
    parser.add_argument(
        "--train-size", type=int, default=DEFAULT_TRAIN_SIZE,
        help=f"number of training examples (default {DEFAULT_TRAIN_SIZE})",
    )  # fmt: skip
    parser.add_argument(
        "--eval-size", type=int, default=DEFAULT_EVAL_SIZE,
        help=f"number of held-out eval examples (default {DEFAULT_EVAL_SIZE})",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})"
    )
    parser.set_defaults(handler=run_demo_data_command)


def default_demo_dir(data_dir: Path | None = None) -> Path:
    """Return the default dataset directory: <data dir>/datasets/demo."""
    return (data_dir or default_data_dir()) / "datasets" / "demo"


def run_demo_data_command(args: argparse.Namespace) -> int:
    output = args.output or default_demo_dir(args.data_dir)
    files = write_demo_data(output, args.train_size, args.eval_size, args.seed)
    print(f"wrote {args.train_size} examples to {files.train}")
    print(f"wrote {args.eval_size} examples to {files.eval}")
    return 0
