"""The models the service generates with, loaded on first use and kept in an LRU cache.

Model ids: the name of a merged model (`<data_dir>/merged/<name>`), or `base/<name>`
for a base checkpoint (`<data_dir>/base/<name>`). A directory counts as a model when it
contains config.json. Models load in float32 on the CPU with
furina.checkpoint.load_causal_lm and load_tokenizer.

Thread safety: the registry's own state is guarded by one lock, and each model is
loaded by one thread while others asking for it wait. Every LoadedModel carries a
`lock` that generation holds for the whole decode loop, because a Hugging Face model
with a KV cache must not run two forward passes at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from furina.checkpoint import load_causal_lm, load_tokenizer
from service.errors import NotFoundError, ServiceError
from service.paths import Root, check_links_inside, check_name, entry_names, resolve_name
from service.settings import Settings

logger = logging.getLogger(__name__)

BASE_PREFIX = "base/"
DEMO_MODEL = "demo"
MODEL_MARKER = "config.json"
LIST_HINT = "GET /v1/models lists the available models"


class NoModelError(ServiceError):
    """A request that names no model while no default model is configured or present."""

    status_code = 422


class ModelLoadError(ServiceError):
    """A model directory that exists but cannot be loaded."""

    status_code = 500


@dataclass(frozen=True)
class ModelEntry:
    """A model the registry can serve: its id, kind, directory and creation time."""

    id: str
    root: Root
    name: str
    path: Path
    created: int  # Unix time of the directory's last change


@dataclass
class LoadedModel:
    """A model in memory. Hold `lock` while running it."""

    id: str
    path: Path
    model: nn.Module
    tokenizer: object
    version: tuple[int, int]  # (inode, mtime) of the directory when it was loaded
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelRegistry:
    """Lists the servable models and loads them on first use, least recently used evicted."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir
        self.cache_size = settings.model_cache_size
        self._cache: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}
        self._closed = False

    def list_models(self) -> list[ModelEntry]:
        """List every merged model, then every base model, each sorted by name."""
        entries = []
        for root in (Root.MERGED, Root.BASE):
            for name in entry_names(self.data_dir, root):
                directory = self.data_dir / root / name
                if (directory / MODEL_MARKER).is_file():
                    entries.append(_entry(root, name, directory))
        return entries

    def resolve(self, model_id: str | None) -> ModelEntry:
        """Find a model by id; None means the default model.

        Raises NotFoundError for an unknown id, InvalidNameError for an id that is not a
        plain name, and NoModelError when model_id is None and there is no default.
        """
        if model_id is None:
            model_id = self.default_model_id()
        root, name = _split_id(model_id)
        directory = resolve_name(self.data_dir, root, name)
        if not (directory / MODEL_MARKER).is_file():
            raise NotFoundError(f"model {model_id!r} not found: {LIST_HINT}")
        return _entry(root, name, directory)

    def default_model_id(self) -> str:
        """Return settings.default_model, else `demo` when merged/demo exists."""
        if self.settings.default_model:
            return self.settings.default_model
        if (self.data_dir / Root.MERGED / DEMO_MODEL / MODEL_MARKER).is_file():
            return DEMO_MODEL
        raise NoModelError(
            "no model given and no default model: name one in the request's 'model' field "
            f"({LIST_HINT}), or set FURINA_DEFAULT_MODEL"
        )

    def get(self, model_id: str | None) -> LoadedModel:
        """Return the loaded model, loading it first when needed. Blocks: call off the event loop.

        A model whose directory was replaced since it was loaded (a new merge under the
        same name) is loaded again.
        """
        entry = self.resolve(model_id)
        version = _directory_version(entry.path)
        cached = self._cached(entry.id, version)
        if cached is not None:
            return cached

        with self._load_lock(entry.id):
            cached = self._cached(entry.id, version)
            if cached is not None:
                return cached
            loaded = self._load(entry, version)
            self._store(loaded)
        return loaded

    def loaded_ids(self) -> list[str]:
        """Ids of the models in memory, least recently used first."""
        with self._lock:
            return list(self._cache)

    def ready(self) -> bool:
        """Return whether models can be served: the registry is open and its roots exist."""
        roots = [self.data_dir / Root.MERGED, self.data_dir / Root.BASE]
        return not self._closed and all(root.is_dir() for root in roots)

    def close(self) -> None:
        """Drop every loaded model. Requests already holding one finish with it."""
        with self._lock:
            self._closed = True
            count = len(self._cache)
            self._cache.clear()
        logger.info("model registry closed, %d models unloaded", count)

    def _cached(self, model_id: str, version: tuple[int, int]) -> LoadedModel | None:
        with self._lock:
            loaded = self._cache.get(model_id)
            if loaded is None:
                return None
            if loaded.version != version:
                logger.info("model %s changed on disk: loading it again", model_id)
                del self._cache[model_id]
                return None
            self._cache.move_to_end(model_id)
            return loaded

    def _load_lock(self, model_id: str) -> threading.Lock:
        with self._lock:
            return self._load_locks.setdefault(model_id, threading.Lock())

    def _load(self, entry: ModelEntry, version: tuple[int, int]) -> LoadedModel:
        started = time.perf_counter()
        check_links_inside(self.data_dir, entry.root, entry.name)
        try:
            model = load_causal_lm(entry.path)
            tokenizer = load_tokenizer(entry.path)
        except (OSError, ValueError) as error:
            logger.error("cannot load model %s from %s: %s", entry.id, entry.path, error)
            raise ModelLoadError(
                f"model {entry.id!r} cannot be loaded: {error}; the server log has the details"
            ) from error
        logger.info("loaded model %s in %.2f s", entry.id, time.perf_counter() - started)
        return LoadedModel(entry.id, entry.path, model, tokenizer, version)

    def _store(self, loaded: LoadedModel) -> None:
        with self._lock:
            if self._closed:
                return
            self._cache[loaded.id] = loaded
            self._cache.move_to_end(loaded.id)
            while len(self._cache) > self.cache_size:
                evicted, _ = self._cache.popitem(last=False)
                logger.info(
                    "evicted model %s from memory: the model cache keeps %d models",
                    evicted, self.cache_size,
                )


def model_id(root: Root, name: str) -> str:
    """Return the public id of a model directory name in root."""
    return BASE_PREFIX + name if root == Root.BASE else name


def _split_id(model_id: str) -> tuple[Root, str]:
    if model_id.startswith(BASE_PREFIX):
        root, name = Root.BASE, model_id.removeprefix(BASE_PREFIX)
    else:
        root, name = Root.MERGED, model_id
    check_name(root, name)
    return root, name


def _entry(root: Root, name: str, directory: Path) -> ModelEntry:
    created = int(os.stat(directory).st_mtime)
    return ModelEntry(model_id(root, name), root, name, directory, created)


def _directory_version(directory: Path) -> tuple[int, int]:
    # Merges write into a temporary directory renamed into place, so a replaced
    # model has a new inode.
    status = os.stat(directory)
    return status.st_ino, status.st_mtime_ns
