"""Shared fixtures: the digits fixtures (read once per session) and tiny-network factories."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from labelscan.model import LaftrNet

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DIGITS_SCALE = 1 / 16  # the fixture models were trained on pixel / 16


@dataclass
class Digits:
    x: torch.Tensor  # float32 (1797, 64), already scaled by 1/16
    y: torch.Tensor  # int64 (1797,), the noisy labels
    flipped: np.ndarray  # bool (1797,), True where the label was flipped
    ids: list[str]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def digits() -> Digits:
    table = pd.read_parquet(FIXTURES / "digits_noisy.parquet")
    pixels = table[[f"pixel_{i}" for i in range(64)]].to_numpy(np.float32) * np.float32(DIGITS_SCALE)
    flipped = np.zeros(len(table), dtype=bool)
    flipped[pd.read_csv(FIXTURES / "digits_flipped.csv")["row"].to_numpy()] = True
    return Digits(torch.from_numpy(pixels.copy()), torch.from_numpy(table["label"].to_numpy().copy()),
                  flipped, table["example_id"].tolist())


@pytest.fixture(scope="session")
def digits_dataset():
    from labelscan import Preprocessing, open_dataset

    return open_dataset(FIXTURES / "digits_noisy.parquet", id_column="example_id",
                        preprocessing=Preprocessing(scale=DIGITS_SCALE))


@pytest.fixture(scope="session")
def digits_mlp() -> LaftrNet:
    from labelscan.model import load_model

    return load_model(FIXTURES / "digits_mlp.pt2")


@pytest.fixture(scope="session")
def digits_summary(digits_mlp, digits_dataset):
    """The digits MLP's per-class LAFTR summary (read-only: tests must not modify it)."""
    from labelscan import summarize

    return summarize(digits_mlp, digits_dataset, per_class=True)


# ------------------------------------------------------------------ tiny networks


def tiny_net(*layers: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> LaftrNet:
    """A LaftrNet from freshly initialised layers (seeded), frozen in eval mode."""
    torch.manual_seed(seed)
    for layer in layers:
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    sequential = nn.Sequential(*layers).eval().requires_grad_(False)
    with torch.no_grad():
        outputs = sequential(torch.zeros(1, *input_shape)).shape[1]
    return LaftrNet(sequential, tuple(input_shape), int(outputs))


def synthetic_data(input_shape, num_classes, count=600, seed=0):
    """Inputs from a class-dependent, non-Gaussian distribution, and unbalanced labels."""
    generator = torch.Generator().manual_seed(seed)
    d = math.prod(input_shape)
    weights = torch.linspace(1.0, 2.0, num_classes)  # unequal class sizes
    y = torch.multinomial(weights, count, replacement=True, generator=generator)
    centers = torch.randn(num_classes, d, generator=generator)
    mixing = torch.randn(d, d, generator=generator) / math.sqrt(d)
    noise = torch.rand(count, d, generator=generator) * 2 - 1  # uniform, not Gaussian
    x = centers[y] + noise @ mixing.T * 1.5
    return x.view(count, *input_shape), y


def batches(x, y, sizes=(97, 203, 150)):
    """Split (x, y) into uneven batches so that streaming accumulation is exercised."""
    out, start = [], 0
    for size in sizes:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    if start < len(x):
        out.append((x[start:], y[start:]))
    return out


def perturbed(params: dict[str, torch.Tensor], scale: float = 0.1, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()}


def flatten(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()])


def unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for k, v in like.items():
        out[k] = flat[start : start + v.numel()].view(v.shape)
        start += v.numel()
    return out
