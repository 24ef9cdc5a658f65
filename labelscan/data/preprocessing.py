"""Input preprocessing that must match training: scale, then per-channel mean and std."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from labelscan.errors import LabelscanError


def _floats(values, what: str) -> tuple[float, ...]:
    """Coerce user or manifest values to finite floats, or say which field is wrong."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise LabelscanError(
            f"preprocessing {what} (--{what}) must be a list of numbers, got {values!r}"
        ) from None
    if not all(math.isfinite(v) for v in out):
        raise LabelscanError(f"preprocessing {what} (--{what}) must be finite numbers, got {', '.join(map(str, out))}")
    return out


@dataclass(frozen=True)
class Preprocessing:
    """x ↦ (x · scale − mean) / std, with mean and std per channel (dim 1) or one value for all.

    Recorded in the workspace manifest so that `rank` sees inputs exactly as `summarize` did.
    """

    scale: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        (scale,) = _floats([self.scale], "scale")
        if scale == 0:
            raise LabelscanError("preprocessing scale (--scale) must be non-zero, got 0")
        std = _floats(self.std, "std")
        if any(v <= 0 for v in std):
            raise LabelscanError(f"preprocessing std (--std) must be positive, got {', '.join(map(str, std))}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "mean", _floats(self.mean, "mean"))
        object.__setattr__(self, "std", std)

    def check(self, feature_shape: tuple[int, ...]) -> None:
        """Refuse mean/std whose length fits neither one value nor the channel/feature count."""
        width = feature_shape[0]
        unit = "features" if len(feature_shape) == 1 else "channels"
        for what, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (0, 1, width):
                raise LabelscanError(
                    f"preprocessing {what} has {len(values)} values but the data has "
                    f"{width} {unit}; give 1 value or {width}"
                )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 (B, *feature_shape) → same shape, preprocessed."""
        self.check(tuple(x.shape[1:]))
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean:
            x = x - self._per_channel(self.mean, x.ndim)
        if self.std:
            x = x / self._per_channel(self.std, x.ndim)
        return x

    @staticmethod
    def _per_channel(values: tuple[float, ...], ndim: int) -> torch.Tensor:
        """Shape (1, len, 1, …) so values broadcast along dim 1 of a (B, …) batch."""
        return torch.tensor(values, dtype=torch.float32).reshape(1, -1, *[1] * (ndim - 2))

    def to_dict(self) -> dict:
        """JSON-ready record for the manifest."""
        return {"scale": self.scale, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """Inverse of to_dict; a malformed record is bad input, not a crash."""
        if not isinstance(d, dict):
            raise LabelscanError(f"preprocessing record must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {"scale", "mean", "std"})
        if unknown:
            raise LabelscanError(
                f"preprocessing record has unknown keys {unknown}; expected scale, mean and std"
            )
        return cls(**d)
