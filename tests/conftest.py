"""Shared test set-up: offline hub, headless plots, deterministic seeds, tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

import hf_eot  # noqa: E402,F401  (registers "eot")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
