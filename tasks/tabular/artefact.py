"""The run's usable model: one file with the weights, the fitted preprocessing and the schema.

``model.fedsilo.npz`` (NumPy, no pickles): the model's arrays (``w/<name>``) and ``meta``, a
JSON string::

    {"format": "fedsilo-model-v1", "model": {"name", "hidden", "dropout", "width", "outputs"},
     "kind", "classes", "schema": {...}, "preprocessor": {...} | null, "sealed": {...} | null,
     "features": [...]}

Under ``aggregation=paillier`` the coordinator never holds the model or the statistics in
the clear: the arrays are the encrypted aggregate and ``sealed`` the encrypted totals, so
only a site with the key pair can use the file (``fedsilo predict ... --keypair``).
:class:`Predictor` scores raw rows: read and checked against the schema like a site's
file, transformed by the fitted preprocessing, scored by the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.models import MLP, LogisticRegression, SmallCNN
from tasks.tabular.prep import Preprocessor
from tasks.tabular.schema import Schema
from tasks.tabular.table import Table, read

FORMAT = "fedsilo-model-v1"
FILE = "model.fedsilo.npz"


class ArtefactError(ValueError):
    """The model file is missing, malformed, or needs a key to be used."""


def write(path: Path, state: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write the model file at ``path``: the model's arrays and ``meta`` (task, schema, preprocessing); return ``path``."""
    arrays = {f"w/{k}": np.asarray(v) for k, v in state.items()}
    arrays["meta"] = np.array(json.dumps({"format": FORMAT, **meta}, sort_keys=True))
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(path)
    return path


def load(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The model's arrays and metadata from a model file (or a run directory holding one); ArtefactError otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / FILE
    if not p.is_file():
        raise ArtefactError(f"no fedsilo model at {p} (runs of task=tabular write {FILE} into their run directory)")
    try:
        with np.load(p, allow_pickle=False) as z:
            contents = {k: z[k] for k in z.files}
        meta = json.loads(str(contents.pop("meta")))
    except (OSError, ValueError, KeyError) as err:
        raise ArtefactError(f"{p} is not a readable fedsilo model: {err}") from err
    if meta.get("format") != FORMAT:
        raise ArtefactError(f"{p}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return {k[2:]: v for k, v in contents.items() if k.startswith("w/")}, meta


def build(meta: dict[str, Any]) -> nn.Module:
    """A fresh model of the architecture ``meta`` describes."""
    m = meta["model"]
    if meta.get("task") == "images":
        img = meta["image"]
        return SmallCNN(hidden=int(m["hidden"][0]) if m["hidden"] else 64, dropout=float(m["dropout"]),
                        in_channels=int(img["channels"]), size=int(img["size"]), outputs=int(m["outputs"]))
    if m["name"] == "logreg":
        return LogisticRegression(int(m["width"]), int(m["outputs"]))
    return MLP(int(m["width"]), list(m["hidden"]), float(m["dropout"]), int(m["outputs"]))


def preprocessor(meta: dict[str, Any], vocab: dict[str, list[str]], moments: tuple[float, ...],
                 spread: tuple[float, ...], standardize: str) -> Any:
    """The fitted preprocessing of a model file's task from its totals (decrypted at a site under Paillier)."""
    if meta.get("task") == "images":
        from tasks.images import ImagePreprocessor

        img = meta["image"]
        return ImagePreprocessor(tuple(meta["classes"]), int(img["channels"]), int(img["size"]), moments, spread)
    return Preprocessor(Schema.parse(meta["schema"], "saved model"), vocab, moments, spread, standardize)


def _preprocessor_from_dict(meta: dict[str, Any]) -> Any:
    if meta.get("task") == "images":
        from tasks.images import ImagePreprocessor

        return ImagePreprocessor.from_dict(meta["preprocessor"])
    return Preprocessor.from_dict(meta["preprocessor"])


@dataclass
class Predictor:
    """A model and its preprocessing, ready to score raw rows (or, for task=images, a folder of images)."""

    model: nn.Module
    prep: Any          # tasks.tabular.prep.Preprocessor or tasks.images.ImagePreprocessor
    meta: dict[str, Any]

    @classmethod
    def from_parts(cls, state: dict[str, np.ndarray], meta: dict[str, Any], prep: Any = None) -> Predictor:
        """A predictor from a model file's parts (``prep``: the preprocessing, if the file holds it sealed)."""
        if prep is None:
            if meta.get("preprocessor") is None:
                raise ArtefactError("this model's preprocessing is encrypted (aggregation=paillier): score rows "
                                    "at a site with its key pair: fedsilo predict RUN_DIR FILE --keypair KEYPAIR")
            prep = _preprocessor_from_dict(meta)
        model = build(meta)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        model.eval()
        return cls(model, prep, meta)

    @property
    def schema(self) -> Schema:
        """The schema the model reads its inputs by."""
        return self.prep.schema  # type: ignore[no-any-return]

    @property
    def kind(self) -> str:
        """The label kind: binary, multiclass or regression."""
        return str(self.meta.get("kind", "binary"))

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names, in the model's order."""
        if self.meta.get("task") == "images":
            return tuple(self.meta["classes"])
        return tuple(self.schema.label.classes)

    @property
    def id_column(self) -> str | None:
        """The column (or, for images, the file name) that names each scored row, if any."""
        return self.meta.get("id") if self.meta.get("task") == "images" else self.schema.id

    def score_table(self, table: Table) -> dict[str, np.ndarray]:
        """Columns of scores: ``score`` (binary: probability of the positive class), ``p_<class>`` and
        ``predicted`` (multiclass), ``prediction`` (regression, on the label's scale)."""
        with torch.no_grad():
            out = self.model(torch.from_numpy(self.prep.transform(table))).double()
        if self.kind == "binary":
            return {"score": torch.sigmoid(out).numpy()}
        if self.kind == "regression":
            mean, std = self.prep.label_scale()
            return {"prediction": out.numpy() * std + mean}
        p = torch.softmax(out, dim=-1).numpy()
        cols = {f"p_{c}": p[:, k] for k, c in enumerate(self.classes)}
        cols["predicted"] = np.asarray(self.classes, dtype=object)[np.argmax(p, axis=1)]
        return cols

    def score_file(self, path: str | Path) -> tuple[Any, dict[str, np.ndarray]]:
        """Score a file of raw rows (or, for task=images, a folder of images)."""
        if self.meta.get("task") == "images":
            from tasks.images import read_folder

            img = self.meta["image"]
            table: Any = read_folder(Path(path).expanduser(), list(self.classes), int(img["channels"]),
                                     int(img["size"]), labelled=False)
        else:
            table = read(path, self.schema, labelled=False)
        return table, self.score_table(table)
