"""``fedsilo predict RUN_DIR FILE`` for a sum-based learner's run (``gbdt``, ``glm``, ``auto``): raw rows in,
the model's scores out.

The run's ``model.json`` holds the model and, for ``task=tabular``, the schema's text and the discovered
categories: FILE is read and checked against that schema exactly as a site reads its own file, turned into
the model's inputs as the sites did (:mod:`learners.rows`) and scored. The columns are those of every fedsilo
model: ``score`` (binary), ``p_<class>`` and ``predicted`` (multiclass), ``prediction`` (regression).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from learners import glm
from learners.gbdt import model as trees
from learners.rows import table_rows

MODEL_FILE = "model.json"
#: the model files a learner writes, by their ``format``
FORMATS: dict[str, Any] = {trees.FORMAT: trees.Ensemble.from_dict, glm.FORMAT: glm.LinearModel.from_dict}


def is_learner_model(run_dir: Path) -> bool:
    """Whether ``run_dir`` (a folder or its model file) holds a sum-based learner's model."""
    path = run_dir / MODEL_FILE if run_dir.is_dir() else run_dir
    if not path.is_file() or path.suffix != ".json":
        return False
    try:
        return json.loads(path.read_text()).get("format") in FORMATS
    except (ValueError, OSError):
        return False


@dataclass
class LearnerPredictor:
    """A fitted model (trees or a linear model) and the schema its inputs are read by."""

    model: Any
    schema: Any

    @classmethod
    def load(cls, run_dir: Path) -> LearnerPredictor:
        """The run's model; ValueError if it cannot score raw rows (a bundled task's model has no schema)."""
        from tasks.tabular.schema import Schema, _loader

        path = run_dir / MODEL_FILE if run_dir.is_dir() else run_dir
        raw = json.loads(path.read_text())
        model = FORMATS[raw.get("format")](raw)
        if not model.schema:
            raise ValueError(f"{path}: a model of a bundled task (no schema): score its inputs in Python "
                             "(learners.predict.FORMATS; trees also with xgboost on model.xgb.json)")
        import yaml

        schema = Schema.parse(yaml.load(model.schema, Loader=_loader()), f"{path} (its schema)")  # noqa: S506
        return cls(model, schema)

    @property
    def id_column(self) -> str | None:
        """The schema's id column."""
        return self.schema.id  # type: ignore[no-any-return]

    def score_table(self, table: Any) -> dict[str, np.ndarray]:
        """The scores of a checked table's rows."""
        x = table_rows(self.schema, table, self.model.vocab or {}).x
        p = self.model.predict(x)
        if self.model.objective == "binary":
            return {"score": p}
        if self.model.objective == "regression":
            return {"prediction": p}
        classes = self.schema.label.classes
        cols = {f"p_{c}": p[:, k] for k, c in enumerate(classes)}
        cols["predicted"] = np.asarray(classes, dtype=object)[np.argmax(p, axis=1)]
        return cols

    def score_file(self, path: str | Path) -> tuple[Any, dict[str, np.ndarray]]:
        """Read ``path`` against the schema (the sites' checks and messages) and score its rows."""
        from tasks.tabular.table import read

        table = read(path, self.schema, labelled=False)
        return table, self.score_table(table)
