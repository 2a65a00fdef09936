"""Write a directory under a temporary sibling name and rename it into place on success.

The temporary name starts with "." and ends with ".tmp", so a directory left behind by
a killed process never looks like a model or an adapter to a tool that lists models.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from merger.errors import MergeError

logger = logging.getLogger(__name__)


def check_output_dir(output_dir: Path, overwrite: bool, protected: dict[str, Path]) -> None:
    """Reject an output path that exists (unless overwrite) or that would replace an input.

    protected maps a role ("base", "adapter") to an input directory that the output
    must neither be nor contain.
    """
    resolved = output_dir.resolve()
    for role, input_dir in protected.items():
        input_resolved = input_dir.resolve()
        if resolved == input_resolved or resolved in input_resolved.parents:
            raise MergeError(
                f"output directory {output_dir} would replace the {role} directory {input_dir}: "
                "choose a new output path"
            )
    _warn_stale_temporaries(output_dir)
    if output_dir.exists() and not overwrite:
        raise MergeError(
            f"output directory {output_dir} already exists: pass overwrite=True "
            "(--overwrite) to replace it, or choose a new path"
        )


def _warn_stale_temporaries(output_dir: Path) -> None:
    stale = sorted(output_dir.parent.glob(f".{output_dir.name}.*.tmp"))
    if stale:
        logger.warning(
            "found %d temporary directories from interrupted writes of %s, for example %s: "
            "delete them once no merge or export to this path is running",
            len(stale),
            output_dir,
            stale[0],
        )


@contextmanager
def atomic_output_dir(output_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes output_dir when the block succeeds.

    Any exception, including KeyboardInterrupt and cancellation, removes the temporary
    directory. An existing output_dir is replaced only after the new one is complete.
    A SIGKILL leaves only the hidden `.<name>.*.tmp` directory.
    """
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(
        tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent)
    )
    # mkdtemp creates mode 0700; a published model directory gets the usual 0755.
    temporary.chmod(0o755)
    try:
        yield temporary
        replace_dir(temporary, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def replace_dir(source: Path, target: Path, overwrite: bool) -> None:
    """Rename source to target; with overwrite, move an existing target aside first.

    The old target is renamed to a hidden `.tmp` name and deleted only after the new
    directory is in place, so target never contains a half-deleted model.
    """
    if not target.exists():
        source.rename(target)
        return
    if not overwrite:
        raise MergeError(
            f"output directory {target} appeared while the merge was running: "
            "pass overwrite=True (--overwrite) to replace it"
        )

    previous = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex[:8]}.tmp"
    target.rename(previous)
    try:
        source.rename(target)
    except OSError:
        previous.rename(target)
        raise
    if previous.is_dir():
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.remove(previous)
    logger.info("replaced existing %s", target)
