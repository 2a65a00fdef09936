"""Exceptions raised by a merge or an export."""

from __future__ import annotations


class MergeError(ValueError):
    """A merge or export that cannot run on these inputs, or whose result failed a check.

    Raised before anything is written when the inputs do not fit together, and after a
    tensor is folded when the result is non-finite. The output directory is never left
    behind when it is raised.
    """


class MergeCancelled(Exception):
    """A merge stopped because its cancel_event was set; it left no output behind."""
