"""Data directory layout, and confinement of the names in a request to their root.

    <data_dir>/base/<name>       Hugging Face base checkpoints
    <data_dir>/adapters/<name>   FURINA adapter directories
    <data_dir>/merged/<name>     merged checkpoints written by merge jobs
    <data_dir>/jobs.db           SQLite database of merge jobs

A request names a model or an adapter by a plain name (letters, digits, '.', '_', '-'),
never by a path. `resolve_name` rejects anything else with InvalidNameError (HTTP 400),
including a symbolic link inside the root that resolves outside it. A symbolic link to
another entry of the same root is allowed. `check_links_inside` applies the same rule,
with the whole data directory as the limit, to the files inside an entry.
"""

from __future__ import annotations

import logging
import os
import re
from enum import StrEnum
from pathlib import Path

from service.errors import InvalidNameError

logger = logging.getLogger(__name__)

JOBS_DATABASE = "jobs.db"
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
MAX_NAME_LENGTH = 128


class Root(StrEnum):
    """A directory of the data directory that contains one kind of named entry."""

    BASE = "base"
    ADAPTERS = "adapters"
    MERGED = "merged"

    @property
    def noun(self) -> str:
        return {"base": "base model", "adapters": "adapter", "merged": "merged model"}[self.value]


def ensure_layout(data_dir: Path) -> None:
    """Create the data directory and its roots where they are missing."""
    for root in Root:
        (data_dir / root).mkdir(parents=True, exist_ok=True)


def check_name(root: Root, name: str) -> None:
    """Raise InvalidNameError, with the reason, unless name is a plain name for root."""
    label = f"{root.noun} name"
    hint = f"give the name of an entry of {root.value}/, for example 'my-model'"
    if not name:
        raise InvalidNameError(f"{label} is empty: {hint}")
    if name.startswith("/") or os.path.isabs(name):
        raise InvalidNameError(f"{label} {name!r} is an absolute path: {hint}")
    if ".." in re.split(r"[/\\]", name):
        raise InvalidNameError(f"{label} {name!r} contains '..': {hint}")
    if "/" in name or "\\" in name:
        raise InvalidNameError(f"{label} {name!r} contains a path separator: {hint}")
    if name.startswith("."):
        raise InvalidNameError(
            f"{label} {name!r} starts with '.', which is reserved for temporary directories: {hint}"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(
            f"{label} is {len(name)} characters long, the maximum is {MAX_NAME_LENGTH}"
        )
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidNameError(
            f"{label} {name!r} contains characters other than letters, digits, '.', '_' and '-'"
        )


def resolve_name(data_dir: Path, root: Root, name: str) -> Path:
    """Return data_dir/root/name after checking that it stays inside data_dir/root.

    The entry need not exist. Raises InvalidNameError for a name that is not plain or
    that is a symbolic link resolving outside the root.
    """
    check_name(root, name)
    root_dir = (data_dir / root).resolve()
    path = root_dir / name

    if not _resolves_inside(path, root_dir):
        # The target stays in the server log: it may reveal paths outside the data dir.
        logger.warning("rejected %s %r: symbolic link to %s", root.noun, name, _resolved(path))
        raise InvalidNameError(
            f"{root.noun} {name!r} is a symbolic link that resolves outside {root.value}/ "
            f"or loops: replace it with a directory or a link to another entry of {root.value}/"
        )
    return path


def check_links_inside(data_dir: Path, root: Root, name: str) -> None:
    """Raise InvalidNameError when a symbolic link below an entry resolves outside data_dir.

    resolve_name checks the entry itself, and this checks every file and folder inside it,
    because a merge reads them and copies them into merged/. A base's tokenizer.json
    linked to a file elsewhere would otherwise be copied, and so published. Links within
    data_dir are allowed.
    NOTE: the check runs when a job is submitted or a model loaded; a link created
    after that is followed.
    """
    data_root = data_dir.resolve()
    entry = data_dir / root / name
    # os.walk does not enter linked folders (followlinks=False), but lists them.
    for folder, subfolders, files in os.walk(entry):
        for child in subfolders + files:
            path = Path(folder) / child
            if not path.is_symlink():
                continue
            target = _resolved(path)
            if target is None or not target.is_relative_to(data_root):
                inner = path.relative_to(entry)
                logger.warning(
                    "rejected %s %r: %s is a symbolic link to %s", root.noun, name, inner, target
                )
                raise InvalidNameError(
                    f"{root.noun} {name!r} contains {inner}, a symbolic link that resolves "
                    "outside the data directory or loops: replace it with the file itself"
                )


def entry_names(data_dir: Path, root: Root) -> list[str]:
    """List the names in data_dir/root that resolve_name accepts, sorted.

    Hidden entries (temporary directories), names that are not plain and symbolic
    links that resolve outside the root are left out.
    """
    root_dir = (data_dir / root).resolve()
    if not root_dir.is_dir():
        return []
    names = []
    for child in sorted(root_dir.iterdir()):
        try:
            check_name(root, child.name)
        except InvalidNameError:
            continue
        if _resolves_inside(child, root_dir):
            names.append(child.name)
    return names


def relative_path(root: Root, name: str) -> str:
    """Return the entry's path relative to the data directory, as shown to API clients."""
    return f"{root.value}/{name}"


def _resolves_inside(path: Path, root_dir: Path) -> bool:
    """Return whether path, with every symbolic link followed, is an entry below root_dir."""
    resolved = _resolved(path)
    return resolved is not None and resolved != root_dir and resolved.is_relative_to(root_dir)


def _resolved(path: Path) -> Path | None:
    """Return path with every symbolic link followed, or None for a symbolic link loop."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError for a loop
        return None
