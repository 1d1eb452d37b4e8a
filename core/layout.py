"""A model's arrays as one flat float64 vector, and back: what every update codec works on."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of the model's arrays, in the order they are flattened."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, arrays: dict[str, np.ndarray]) -> Layout:
        """The layout of ``arrays``: names, shapes and dtypes, in order."""
        return cls(tuple(arrays), tuple(tuple(a.shape) for a in arrays.values()),
                   tuple(str(a.dtype) for a in arrays.values()))

    @property
    def size(self) -> int:
        """Values in all arrays."""
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def flatten(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The arrays as one float64 vector, in layout order."""
        return np.concatenate([np.asarray(arrays[n], dtype=np.float64).ravel() for n in self.names])

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The arrays of a vector :meth:`flatten` made, with their shapes and dtypes."""
        out: dict[str, np.ndarray] = OrderedDict()
        start = 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            size = int(np.prod(shape))
            out[name] = flat[start : start + size].reshape(shape).astype(dtype)
            start += size
        return out
