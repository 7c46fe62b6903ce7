"""The engine replica skips Ray Serve LLM's per-node download task only for a local folder."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from tokenmart.deployments.engine_server import skip_local_node_init


def _config(source: str) -> SimpleNamespace:
    callback = SimpleNamespace(ctx=SimpleNamespace(run_init_node=True))
    return SimpleNamespace(
        model_loading_config=SimpleNamespace(model_source=source), get_or_create_callback=lambda: callback
    )


def test_a_model_in_a_local_folder_skips_the_node_init_task(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    config = _config(str(tmp_path))
    assert skip_local_node_init(config) is True
    assert config.get_or_create_callback().ctx.run_init_node is False
    assert (tmp_path / "torch-home" / "kernels").is_dir()  # what the skipped task would have made


def test_a_hub_id_or_a_missing_folder_still_downloads(tmp_path: Path) -> None:
    for source in ("HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path / "missing")):
        config = _config(source)
        assert skip_local_node_init(config) is False
        assert config.get_or_create_callback().ctx.run_init_node is True
