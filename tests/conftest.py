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
    from hairdiff_core.models.tiny import build_tiny_transformer

    return build_tiny_transformer()


@pytest.fixture(scope="session")
def _tiny_vae_master():
    from hairdiff_core.models.tiny import build_tiny_vae

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


@pytest.fixture
def assert_same_output():
    """Compare the outputs of two separately built or loaded copies of one model.

    Their weights are compared bit for bit elsewhere; their outputs are not: a tensor read from a
    safetensors file starts 40 bytes past a 64-byte boundary, so on some CPUs (AVX512) the GEMM
    takes another kernel path than for freshly allocated memory and the last bits differ
    (~1e-6). One model, one allocation, compared with itself stays bit-exact (torch.equal).
    """

    def check(actual, expected):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)

    return check
