"""Medical imaging: breast-ultrasound classification on BreastMNIST (MedMNIST v2; Yang et
al., 2023; from Al-Dhabyani et al., 2020). 780 grey 28x28 images.

Positive class (label 1 here) = malignant; MedMNIST's own label 0 is malignant, so labels
are flipped, and sensitivity means "malignant tumours found". The pool is MedMNIST's
train and validation splits (546 + 78); the held-out test set is its official test split
(156). Pixels are scaled to [0, 1] and standardised with the pool's mean and std.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn
from typing_extensions import override

from tasks.base import PooledTask, Split, TaskData
from tasks.models import SmallCNN
from tasks.training import Augment

FILE = "breastmnist/breastmnist.npz"


def flip_and_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flips per image and one random translation per batch (zero fill)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    padded = nn.functional.pad(x, (max_shift,) * 4)
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


class MedicalImagingTask(PooledTask):
    """Benign/normal vs malignant ultrasound images with a small GroupNorm CNN."""

    name: ClassVar[str] = "medical_imaging"
    input_shape: ClassVar[tuple[int, ...]] = (1, 28, 28)  # one example (a test checks it against the data)
    models: ClassVar[tuple[str, ...]] = ("cnn",)
    natural_sites: ClassVar[tuple[str, ...] | None] = None
    data_files: ClassVar[tuple[str, ...]] = (FILE,)

    @override
    def load(self) -> TaskData:
        path = self.data_dir / FILE
        if not path.is_file():
            raise FileNotFoundError(f"medical_imaging data not found at {path} (data_dir={self.data_dir})")
        with np.load(path) as npz:
            pool_x = np.concatenate([npz["train_images"], npz["val_images"]]).astype(np.float32) / 255.0
            pool_y = 1 - np.concatenate([npz["train_labels"], npz["val_labels"]]).reshape(-1)
            test_x = npz["test_images"].astype(np.float32) / 255.0
            test_y = 1 - npz["test_labels"].reshape(-1)
        mean, std = float(pool_x.mean()), float(pool_x.std())

        def split(x: np.ndarray, y: np.ndarray) -> Split:
            xs = torch.from_numpy(((x - mean) / std)[:, None, :, :].astype(np.float32))
            return Split(xs, torch.from_numpy(y.astype(np.float32)))

        return TaskData(split(pool_x, pool_y), split(test_x, test_y), ("pixels",), None)

    @override
    def augmentation(self) -> Augment | None:
        return flip_and_shift

    @override
    def build_model(self) -> nn.Module:
        hidden = self.cfg.hidden[0] if self.cfg.hidden else 64
        return SmallCNN(hidden=hidden, dropout=self.cfg.dropout)
