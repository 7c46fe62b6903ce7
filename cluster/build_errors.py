"""The one error every step of a builtin-model build raises, so callers catch a single type."""

from __future__ import annotations


class ModelBuildError(RuntimeError):
    """A builtin model could not be built or verified; the message says what to do about it."""
