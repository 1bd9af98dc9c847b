"""Shared fixtures. Tests never need ComfyUI, a GPU or a network.

This file sits in tests/ (not the pack root): a root conftest.py would make pytest import the
pack root package, i.e. ComfyUI's entry point.
"""
from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture(scope="session")
def _tiny_transformer_master():
    from hairdiff_core.tiny import build_tiny_transformer

    return build_tiny_transformer()


@pytest.fixture(scope="session")
def _tiny_vae_master():
    from hairdiff_core.tiny import build_tiny_vae

    return build_tiny_vae()


@pytest.fixture
def tiny_transformer(_tiny_transformer_master):
    """A fresh copy of the tiny (16-channel, stock) transformer; tests may mutate it."""
    return copy.deepcopy(_tiny_transformer_master)


@pytest.fixture
def tiny_vae(_tiny_vae_master):
    return copy.deepcopy(_tiny_vae_master)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
