"""``task=images``: each site's own image folders, normalised with federated channel statistics.

A site's data is a folder with one sub-folder per class (``benign/``, ``malignant/``) of
PNG/JPEG/BMP files, or image files plus a ``labels.csv`` (``file,label``). ``task.data`` is
one such folder (split across sites by ``partition`` in simulation) or a folder of site
folders (``partition=natural``); in a deployment each SuperNode's ``data-path`` names its
own folder. ``task.classes`` lists the class names in order (binary: ``[negative,
positive]``); every image is converted to ``task.channels`` (1 grey, 3 RGB), resized to
``task.image_size`` square (bilinear) and scaled to [0, 1].

Everything else is ``task=tabular``'s machinery (:class:`~tasks.tabular.task.TabularTask`):
held-out test images per site, the statistics phase (per channel: pixel count, sum, and sum
of squared deviations from the federated mean, under the run's protection), pooled test
metrics, the model file and ``fedsilo predict`` (a folder of images to score). The model is
the small CNN with GroupNorm (DP-SGD ready).

    python -m tasks.images OUT [--sites 3]   # BreastMNIST written out as PNG folders, one per site
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn
from typing_extensions import override

from core.config import check
from tasks.base import PartitionConfig, TaskConfig
from tasks.federated import FederatedTask
from tasks.medical_imaging import flip_and_shift
from tasks.models import SmallCNN
from tasks.tabular.evaluation import Spec
from tasks.tabular.schema import Label, Schema
from tasks.tabular.table import SiteInputError
from tasks.training import Augment

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LABELS_FILE = "labels.csv"


@dataclass(frozen=True)
class ImageTable:
    """A site's images, checked: pixels (rows, channels, size, size) in [0, 1], class indices, file names."""

    path: str
    pixels: np.ndarray
    label: np.ndarray
    line: np.ndarray          # the image's index in the folder listing (messages name the file)
    ids: np.ndarray | None    # file names relative to the site folder
    is_test: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def take(self, idx: np.ndarray) -> ImageTable:
        """The images ``idx``."""
        return ImageTable(self.path, self.pixels[idx], self.label[idx], self.line[idx],
                          None if self.ids is None else self.ids[idx])


def load_image(path: Path, channels: int, size: int) -> np.ndarray:
    """One image as (channels, size, size) float32 in [0, 1]; :class:`SiteInputError` naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            im = opened.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise SiteInputError(f"image {path} cannot be read as an image: {err}") from err
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def list_images(folder: Path, classes: list[str], labelled: bool = True) -> list[tuple[Path, int]]:
    """(file, class index) of every image of a site folder; clear errors for what does not fit."""
    if not folder.is_dir():
        raise SiteInputError(f"site folder {folder} does not exist")
    if not labelled:
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in SUFFIXES)
        if not files:
            raise SiteInputError(f"folder {folder} holds no {list(SUFFIXES)} images")
        return [(f, 0) for f in files]
    index = {c: k for k, c in enumerate(classes)}
    labels_csv = folder / LABELS_FILE
    out: list[tuple[Path, int]] = []
    if labels_csv.is_file():
        import csv

        with labels_csv.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"file", "label"} <= set(reader.fieldnames):
                raise SiteInputError(f"{labels_csv}: expected the columns 'file' and 'label', got {reader.fieldnames}")
            for k, row in enumerate(reader, start=2):
                if row["label"] not in index:
                    raise SiteInputError(f"{labels_csv}: column 'label' holds {row['label']!r} at row {k}, which is "
                                         f"not one of task.classes {classes}")
                out.append((folder / row["file"], index[row["label"]]))
    else:
        subdirs = sorted(d for d in folder.iterdir() if d.is_dir())
        unknown = [d.name for d in subdirs if d.name not in index]
        if unknown:
            raise SiteInputError(f"site folder {folder}: sub-folder(s) {unknown} are not among task.classes {classes}")
        for d in subdirs:
            out += [(f, index[d.name]) for f in sorted(d.iterdir()) if f.suffix.lower() in SUFFIXES]
    if not out:
        raise SiteInputError(f"site folder {folder} holds no images (one sub-folder per class of task.classes "
                             f"{classes}, or {LABELS_FILE})")
    return out


def read_folder(folder: Path, classes: list[str], channels: int, size: int, labelled: bool = True) -> ImageTable:
    """A site folder's images, checked and resized, with their classes (``labelled``: from the class folders)."""
    items = list_images(folder, classes, labelled)
    pixels = np.stack([load_image(f, channels, size) for f, _ in items]) if items else np.zeros((0, channels, size, size))
    names = np.array([str(f.relative_to(folder)) for f, _ in items], dtype=object)
    return ImageTable(str(folder), pixels.astype(np.float32), np.array([c for _, c in items], dtype=np.int64),
                      np.arange(len(items)), names)


_READ: dict[tuple[Any, ...], ImageTable] = {}


@dataclass(frozen=True)
class ImageLayout:
    """Statistics of images: ``moments`` = [images, label counts, per channel: pixels, sum];
    ``spread`` = per channel the sum of squared deviations from the federated mean."""

    classes: int
    channels: int
    binary: bool

    @property
    def label_slots(self) -> int:
        """Label counts in the ``moments`` sum: one for binary, one per class otherwise."""
        return 1 if self.binary else self.classes

    @property
    def moments_size(self) -> int:
        """Values of the ``moments`` sum: rows, label counts, and per channel pixels and their sum."""
        return 1 + self.label_slots + 2 * self.channels

    @property
    def spread_size(self) -> int:
        """Values of the ``spread`` sum: one per channel."""
        return self.channels

    def moments(self, t: ImageTable) -> np.ndarray:
        """The site's ``moments`` vector of images ``t``."""
        out: list[float] = [float(len(t))]
        out += [float(t.label.sum())] if self.binary else list(np.bincount(t.label, minlength=self.classes).astype(float))
        for c in range(self.channels):
            x = t.pixels[:, c].astype(np.float64)
            out += [float(x.size), float(x.sum())]
        return np.asarray(out)

    def means(self, moments: np.ndarray) -> dict[str, float]:
        """Each channel's mean pixel from the ``moments`` total."""
        base = 1 + self.label_slots
        return {f"c{c}": float(moments[base + 2 * c + 1] / moments[base + 2 * c]) if moments[base + 2 * c] > 0 else 0.0
                for c in range(self.channels)}

    def spread(self, t: ImageTable, means: dict[str, float]) -> np.ndarray:
        """The site's ``spread`` vector: each channel's squared deviations about ``means``."""
        return np.asarray([float(np.square(t.pixels[:, c].astype(np.float64) - means[f"c{c}"]).sum())
                           for c in range(self.channels)])


@dataclass(frozen=True)
class ImagePreprocessor:
    """Per-channel standardisation with the federated mean and deviation."""

    classes: tuple[str, ...]
    channels: int
    size: int
    moments: tuple[float, ...]
    spread: tuple[float, ...]

    @property
    def layout(self) -> ImageLayout:
        """The statistics layout these totals came from."""
        return ImageLayout(len(self.classes), self.channels, len(self.classes) == 2)

    @property
    def width(self) -> int:
        """Model inputs per image (channels x size x size)."""
        return self.channels * self.size * self.size

    def stats(self) -> list[tuple[float, float]]:
        """Each channel's (mean, std) from the totals."""
        lay = self.layout
        means = lay.means(np.asarray(self.moments))
        base = 1 + lay.label_slots
        out = []
        for c in range(self.channels):
            n = self.moments[base + 2 * c]
            std = float(np.sqrt(self.spread[c] / n)) if n > 0 else 1.0
            out.append((means[f"c{c}"], std if std > 0 else 1.0))
        return out

    def transform(self, t: ImageTable) -> np.ndarray:
        """The images ``t``, standardised per channel (float32)."""
        x = t.pixels.astype(np.float32).copy()
        for c, (mean, std) in enumerate(self.stats()):
            x[:, c] = (x[:, c] - mean) / std
        return x

    def target(self, t: ImageTable) -> np.ndarray:
        """The class indices (or 0/1) of images ``t``."""
        return t.label.astype(np.float32)

    def label_scale(self) -> tuple[float, float]:
        """(0, 1): images have class labels, never a regression scale."""
        return 0.0, 1.0

    def to_dict(self) -> dict[str, Any]:
        """The transform as the model file keeps it."""
        return {"classes": list(self.classes), "channels": self.channels, "size": self.size,
                "moments": list(self.moments), "spread": list(self.spread)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImagePreprocessor:
        """The transform :meth:`to_dict` wrote."""
        return cls(tuple(d["classes"]), int(d["channels"]), int(d["size"]), tuple(map(float, d["moments"])),
                   tuple(map(float, d["spread"])))

    def digest(self) -> str:
        """A short digest of the transform (equal transforms, equal digests)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:24]


class ImagesTask(FederatedTask):
    """Image classification over sites' own folders (binary or multiclass)."""

    name: ClassVar[str] = "images"
    models: ClassVar[tuple[str, ...]] = ("cnn",)

    def __init__(self, cfg: TaskConfig, data_dir: str | Path) -> None:
        super().__init__(cfg, data_dir)
        self.width = cfg.channels * cfg.image_size * cfg.image_size

    @property
    def classes(self) -> list[str]:
        """The class folder names in order (``task.classes``); ValueError if fewer than two."""
        if len(self.cfg.classes) < 2:
            raise ValueError("task=images needs task.classes, the class folder names in order, e.g. "
                             "task.classes=[benign,malignant] (binary: negative first)")
        return [str(c) for c in self.cfg.classes]

    @property
    def schema(self) -> Schema:
        """The schema equivalent (label and refusal rules) the shared machinery reads."""
        classes = tuple(self.classes)
        kind = "binary" if len(classes) == 2 else "multiclass"
        label = Label("class", kind, (classes[1],) if kind == "binary" else (), (classes[0],) if kind == "binary" else None,
                      classes if kind == "multiclass" else ())
        return Schema(label, (), min_rows=self.cfg.min_rows, source=f"task.classes={list(classes)}")

    @override
    @property
    def outputs(self) -> int:
        return 1 if len(self.classes) == 2 else len(self.classes)

    def site_files(self) -> list[Path]:
        """Site folders (natural split): sub-folders of ``task.data`` that are not class folders."""
        p = self.path(self.cfg.data, "data")
        if not p.is_dir():
            return []
        subdirs = sorted(d for d in p.iterdir() if d.is_dir())
        if not subdirs or (p / "labels.csv").is_file() or all(d.name in self.classes for d in subdirs):
            return []  # p is one site's folder
        return subdirs

    def read_site(self, path: str | Path) -> ImageTable:
        """One site's checked images (cached per process)."""
        p = Path(path).expanduser()
        key = (str(p.resolve()), tuple(self.classes), self.cfg.channels, self.cfg.image_size)
        if key not in _READ:
            if len(_READ) > 16:
                _READ.clear()
            _READ[key] = read_folder(p, self.classes, self.cfg.channels, self.cfg.image_size)
        return _READ[key]

    def read_unlabelled(self, path: str | Path) -> ImageTable:
        """The images of a folder without class folders (to score with ``fedsilo predict``)."""
        return read_folder(Path(path).expanduser(), self.classes, self.cfg.channels, self.cfg.image_size, labelled=False)

    @override
    def build_model(self) -> nn.Module:
        return SmallCNN(hidden=self.cfg.hidden[0] if self.cfg.hidden else 64, dropout=self.cfg.dropout,
                        in_channels=self.cfg.channels, size=self.cfg.image_size, outputs=self.outputs)

    @override
    def augmentation(self) -> Augment | None:
        return flip_and_shift

    # ---- the federated-data contract ---------------------------------------------------------------
    @override
    def fingerprint(self) -> str:
        spec = {"task": "images", "classes": self.classes, "channels": self.cfg.channels, "size": self.cfg.image_size,
                "min_rows": self.cfg.min_rows}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]

    @override
    def described_by(self) -> str:
        return f"task.classes={self.classes}, {self.cfg.channels} channel(s), {self.cfg.image_size} px"

    def layout(self, vocab: dict[str, list[str]]) -> ImageLayout:
        """Per-channel pixel statistics and label counts (images have no vocabulary)."""
        return ImageLayout(len(self.classes), self.cfg.channels, len(self.classes) == 2)

    def preprocessor(self, vocab: dict[str, list[str]], moments: tuple[float, ...],
                     spread: tuple[float, ...], standardize: str) -> ImagePreprocessor:
        """Per-channel standardisation from the totals."""
        return ImagePreprocessor(tuple(self.classes), self.cfg.channels, self.cfg.image_size, moments, spread)

    @override
    def eval_spec(self, bins: int) -> Spec:
        return Spec("binary" if len(self.classes) == 2 else "multiclass", len(self.classes), bins)

    @override
    def artefact_meta(self) -> dict[str, Any]:
        return {"task": self.name, "kind": self.label_kind, "classes": self.classes,
                "image": {"channels": self.cfg.channels, "size": self.cfg.image_size}, "id": "file"}

    @classmethod
    def validate_config(cls, t: TaskConfig, p: PartitionConfig) -> None:
        """Range checks of the image keys."""
        super().validate_config(t, p)
        check(len(t.classes) >= 2 and len(set(t.classes)) == len(t.classes), "task.classes", t.classes,
              "two or more distinct class folder names, e.g. [benign,malignant] (binary: negative first)")
        check(t.channels in (1, 3), "task.channels", t.channels, "1 (grey) or 3 (RGB)")
        check(t.image_size >= 8 and t.image_size % 4 == 0, "task.image_size", t.image_size,
              "a multiple of 4, >= 8 (the CNN pools twice)")
        check(t.min_rows >= 1, "task.min_rows", t.min_rows, "an integer >= 1")
        check(bool(t.data), "task.data", t.data, "a site's image folder, or a folder of site folders")


def write_breastmnist_folders(data_dir: Path, out: Path, sites: int = 3, seed: int = 0) -> list[Path]:
    """BreastMNIST (bundled as .npz) written out as PNG folders: ``out/site-k/{benign,malignant}/*.png``,
    every image once, sites drawn at random (seeded). A demo of a site's own image folder."""
    from PIL import Image

    z = np.load(data_dir / "breastmnist" / "breastmnist.npz")
    images = np.concatenate([z["train_images"], z["val_images"], z["test_images"]])
    labels = np.concatenate([z["train_labels"], z["val_labels"], z["test_labels"]]).ravel()
    names = {0: "malignant", 1: "benign"}  # MedMNIST's own labels: 0 = malignant
    order = np.random.default_rng(seed).permutation(len(labels))
    folders = []
    for k, part in enumerate(np.array_split(order, sites)):
        site = out / f"site-{k}"
        for i in part:
            d = site / names[int(labels[i])]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i].astype(np.uint8), mode="L").save(d / f"img{i:04d}.png")
        folders.append(site)
    return folders


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tasks.images", description="BreastMNIST as PNG folders per site")
    parser.add_argument("out", type=Path)
    parser.add_argument("--sites", type=int, default=3)
    args = parser.parse_args(argv)
    folders = write_breastmnist_folders(Path(__file__).resolve().parent / "data", args.out, args.sites)
    print(f"{len(folders)} site folders in {args.out}: task=images task.data={args.out.resolve()} partition=natural "
          "task.classes=[benign,malignant]")
    return 0


__all__ = ["ImageLayout", "ImagePreprocessor", "ImageTable", "ImagesTask", "read_folder", "write_breastmnist_folders"]

if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
