"""Ray Serve LLM's private modules are reached through one adapter (deployments/ray_llm.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tokenmart.deployments import ray_llm

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(ray_llm.PRIVATE_NAMES))
def test_every_private_name_tokenmart_relies_on_resolves(name: str) -> None:
    module, attribute = ray_llm.PRIVATE_NAMES[name]
    assert module.startswith("ray.llm._internal.")
    assert getattr(ray_llm, name) is getattr(__import__(module, fromlist=[attribute]), attribute)


def test_no_other_file_imports_ray_llm_internals() -> None:
    private = re.compile(r"^\s*(from|import)\s+ray\.llm\._internal", re.MULTILINE)
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("deployments", "cluster", "doubles", "loadtest", "tests")
        for path in (REPO / folder).rglob("*.py")
        if path.name != "ray_llm.py" and private.search(path.read_text())
    ]
    assert offenders == []


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        ray_llm.NotAThing  # noqa: B018
