"""Whether a folder in the model cache holds a finished, loadable build: its marker and its checks.

A build is expensive while the check runs on every launch, so a finished build is recorded in a
marker file that lists each file with its size; the fast check is a handful of `stat` calls. The
marker is written last, so an interrupted build never looks finished. The full check
(`verify_model_folder`) loads config and tokenizer and reads the weights' header, once per build.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .build_errors import ModelBuildError
from .converters import import_converters
from .gguf_model import MIN_WEIGHTS_BYTES, SMOLLM2_ARCHITECTURE

MARKER_FILE = ".tokenmart-build.json"
MARKER_FORMAT = 1

WEIGHTS_FILE = "model.safetensors"

_MIB = 1024 * 1024


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The build marker of `folder`, or None when it is missing or unreadable (i.e. not built)."""
    try:
        data = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(folder: Path, marker: dict[str, Any]) -> None:
    """Write the marker through a temporary file and a rename, so a crash leaves no partial marker."""
    path = folder / MARKER_FILE
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise ModelBuildError(
            f"could not write the build marker {path}: {error.strerror or error}. "
            f"Check free space and permissions, then re-run with --force."
        ) from error


def list_files(folder: Path) -> dict[str, int]:
    """Every file of a build with its size, as the marker records it (the marker itself excluded)."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MARKER_FILE
    }


def is_built(
    folder: Path, *, recipe: str | None = None, required: tuple[str, ...] = ("config.json", WEIGHTS_FILE)
) -> bool:
    """Whether `folder` holds a finished build: the marker exists and every file it lists has its size.

    Sizes catch truncated or half-copied files at the cost of a `stat` each; hashing ~270 MB on
    every launch would not be worth it. A same-size corruption needs `force=True` to repair.
    """
    marker = read_marker(folder)
    if marker is None or marker.get("format") != MARKER_FORMAT:
        return False
    if recipe is not None and marker.get("recipe") != recipe:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or any(name not in files for name in required):
        return False
    for relative, size in files.items():
        try:
            if (folder / relative).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def weights_size_problems(weights: Path, minimum_bytes: int) -> list[str]:
    """Why a model's weights file cannot be it: missing, or smaller than the model must be."""
    if not weights.is_file():
        return [f"{weights.name} is missing"]
    size = weights.stat().st_size
    if size < minimum_bytes:
        return [f"{weights.name} is {size / _MIB:.1f} MiB, expected at least {minimum_bytes // _MIB} MiB"]
    return []


def verify_model_folder(folder: Path, *, architecture: str = SMOLLM2_ARCHITECTURE) -> dict[str, Any]:
    """Check that vLLM will be able to load `folder`, without loading the weights.

    Returns a small summary for the marker. Raises ModelBuildError listing every problem found,
    so one failed build shows all of what went wrong rather than the first symptom.
    """
    _, transformers = import_converters()
    from safetensors import safe_open

    problems: list[str] = []
    summary: dict[str, Any] = {}

    config_json: dict[str, Any] = {}
    try:
        config_json = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # any failure here means "config does not load"
        problems.append(f"config.json does not load: {error}")
        config = None
    if config is not None:
        architectures = list(getattr(config, "architectures", None) or [])
        summary["architecture"] = architectures[0] if architectures else None
        if architectures != [architecture]:
            problems.append(f"config.json architectures is {architectures}, expected [{architecture!r}]")
        saved_dtype = config_json.get("dtype", config_json.get("torch_dtype"))
        if saved_dtype != "bfloat16":
            problems.append(f"config.json dtype is {saved_dtype!r}, expected 'bfloat16'")

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # any failure here means "tokenizer does not load"
        problems.append(f"the tokenizer does not load: {error}")
        tokenizer = None
    if tokenizer is not None:
        if not getattr(tokenizer, "chat_template", None):
            problems.append("the tokenizer has no chat template, so /v1/chat/completions would fail")
        else:
            try:
                prompt = tokenizer.apply_chat_template(
                    [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
                )
            except Exception as error:  # a broken template can raise anything
                problems.append(f"the chat template does not render: {error}")
            else:
                if not isinstance(prompt, str) or "hi" not in prompt:
                    problems.append(f"the chat template rendered an unexpected prompt: {prompt!r}")

    weights = folder / WEIGHTS_FILE
    problems += weights_size_problems(weights, MIN_WEIGHTS_BYTES)
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as handle:
                names = list(handle.keys())
                dtypes = {name: handle.get_slice(name).get_dtype() for name in names}
                embed_shape = (
                    list(handle.get_slice("model.embed_tokens.weight").get_shape())
                    if "model.embed_tokens.weight" in dtypes
                    else None
                )
        except Exception as error:  # a damaged header raises library-specific errors
            problems.append(f"{WEIGHTS_FILE} header cannot be read: {error}")
        else:
            summary["tensors"] = len(names)
            not_bf16 = sorted(name for name, dtype in dtypes.items() if dtype != "BF16")
            if not names:
                problems.append(f"{WEIGHTS_FILE} holds no tensors")
            elif not_bf16:
                shown = ", ".join(f"{name}={dtypes[name]}" for name in not_bf16[:5])
                problems.append(f"{len(not_bf16)} tensors in {WEIGHTS_FILE} are not BF16 ({shown})")
            if embed_shape is None:
                problems.append(f"{WEIGHTS_FILE} has no model.embed_tokens.weight")
            elif config is not None:
                expected = [config.vocab_size, config.hidden_size]
                if embed_shape != expected:
                    problems.append(f"model.embed_tokens.weight has shape {embed_shape}, config says {expected}")

    if problems:
        raise ModelBuildError(f"{folder} failed verification:\n  - " + "\n  - ".join(problems))
    return summary
