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

from tasks.models import MLP, LogisticRegression
from tasks.tabular.prep import Preprocessor
from tasks.tabular.schema import Schema
from tasks.tabular.table import Table, read

FORMAT = "fedsilo-model-v1"
FILE = "model.fedsilo.npz"


class ArtefactError(ValueError):
    """The model file is missing, malformed, or needs a key to be used."""


def write(path: Path, state: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    arrays = {f"w/{k}": np.asarray(v) for k, v in state.items()}
    arrays["meta"] = np.array(json.dumps({"format": FORMAT, **meta}, sort_keys=True))
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(path)
    return path


def load(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
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
    m = meta["model"]
    if m["name"] == "logreg":
        return LogisticRegression(int(m["width"]), int(m["outputs"]))
    return MLP(int(m["width"]), list(m["hidden"]), float(m["dropout"]), int(m["outputs"]))


@dataclass
class Predictor:
    """A model and its preprocessing, ready to score raw rows."""

    model: nn.Module
    prep: Preprocessor

    @classmethod
    def from_parts(cls, state: dict[str, np.ndarray], meta: dict[str, Any], prep: Preprocessor | None = None
                   ) -> Predictor:
        if prep is None:
            if meta.get("preprocessor") is None:
                raise ArtefactError("this model's preprocessing is encrypted (aggregation=paillier): score rows "
                                    "at a site with its key pair: fedsilo predict RUN_DIR FILE --keypair KEYPAIR")
            prep = Preprocessor.from_dict(meta["preprocessor"])
        model = build(meta)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        model.eval()
        return cls(model, prep)

    @property
    def schema(self) -> Schema:
        return self.prep.schema

    def score_table(self, table: Table) -> dict[str, np.ndarray]:
        """Columns of scores: ``score`` (binary: probability of the positive class), ``p_<class>`` and
        ``predicted`` (multiclass), ``prediction`` (regression, on the label's scale)."""
        with torch.no_grad():
            out = self.model(torch.from_numpy(self.prep.transform(table))).double()
        lab = self.schema.label
        if lab.kind == "binary":
            return {"score": torch.sigmoid(out).numpy()}
        if lab.kind == "regression":
            mean, std = self.prep.label_scale()
            return {"prediction": out.numpy() * std + mean}
        p = torch.softmax(out, dim=-1).numpy()
        cols = {f"p_{c}": p[:, k] for k, c in enumerate(lab.classes)}
        cols["predicted"] = np.asarray(lab.classes, dtype=object)[np.argmax(p, axis=1)]
        return cols

    def score_file(self, path: str | Path) -> tuple[Table, dict[str, np.ndarray]]:
        table = read(path, self.schema, labelled=False)
        return table, self.score_table(table)
