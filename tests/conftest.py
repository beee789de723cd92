"""Shared fixtures. Integration fixtures (servers, clusters) live in their own modules."""

import pytest
import torch

from vaegan.config import load_config


@pytest.fixture
def debug_cfg():
    """The debug preset in fp32: exact gradient comparisons need deterministic precision."""
    return load_config("debug", overrides=["train.precision=fp32"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
