"""Shared fixtures: tiny random checkpoints of every family, written once per test session."""

from __future__ import annotations

import pytest
import torch

from pop_disagg.models.tiny import ARCHS, make_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """tiny_ckpt(arch) -> folder of a tiny random checkpoint of that family (cached per session)."""
    cache: dict[str, str] = {}

    def get(arch: str = "llama") -> str:
        if arch not in cache:
            cache[arch] = str(make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch))
        return cache[arch]

    return get


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param
