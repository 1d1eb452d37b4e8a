"""A task's data as every layer sees it: preprocessed splits, the pool and test set, one site's share.

Plain containers with no behaviour beyond slicing: the cache (:mod:`tasks.cache`) stores
and restores them without importing the task code that made them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Split:
    """Preprocessed examples: features ``x`` (float32), labels ``y`` (float32 0/1) and,
    where the task has natural groups, the integer group code of each row."""

    x: torch.Tensor
    y: torch.Tensor
    group: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: np.ndarray) -> Split:
        """The rows ``idx`` of the split."""
        t = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.x[t], self.y[t], None if self.group is None else self.group[idx])

    def labels(self) -> np.ndarray:
        """The labels as int64 class indices."""
        return self.y.numpy().astype(np.int64)


@dataclass(frozen=True)
class TaskData:
    """A task's preprocessed data: the pool sites are drawn from and the held-out test set."""

    pool: Split
    test: Split
    feature_names: tuple[str, ...] = ()
    group_names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SiteData:
    """One site's local data: its training rows and its validation rows."""

    site_id: int
    name: str
    train: Split
    val: Split
