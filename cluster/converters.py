"""The conversion libraries as a build uses them: imported only when a build runs, offline, and quiet.

torch, transformers, gguf, accelerate and safetensors take seconds to import, so nothing here imports
them at module load: checking a finished build must stay cheap. During a build the model hub is off
limits (every input is local) and transformers' own bars and warnings are kept out of the rich display.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from importlib import metadata
from typing import Any

from .build_errors import ModelBuildError

CONVERTER_PIP_INSTALL = "pip install 'transformers>=5' gguf accelerate safetensors torch"


def import_converters() -> tuple[Any, Any]:
    """Import torch and transformers only when a build actually runs; both take seconds to import."""
    missing: list[str] = []
    for module in ("torch", "transformers", "gguf", "accelerate", "safetensors"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ModelBuildError(
            f"building the builtin models needs {', '.join(missing)}, which is not installed. "
            f"Install the converters with: {CONVERTER_PIP_INSTALL}"
        )
    import torch
    import transformers

    return torch, transformers


def distribution_version(name: str) -> str | None:
    """The installed version of a tool, recorded in the build marker; None when it is absent."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Forbid model-hub traffic during the build, and only during it.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so setting the variable is not enough
    when it was already imported; the constant is patched too. Both are restored afterwards so a
    caller that later downloads other models is not left offline.
    """
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants: Any = None
    saved_constant: Any = None
    try:
        from huggingface_hub import constants as hub_constants

        constants = hub_constants
        saved_constant = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_constant
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Keep transformers' tqdm bars and load-time warnings from tearing through the rich display.

    The GGUF dequantizer uses its own module-level tqdm, which the transformers switch does not
    reach, so that one is silenced for the duration of the build and put back afterwards.
    """
    import importlib

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_utils: Any = None
    with contextlib.suppress(ImportError):
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
