"""The fitted ensemble: scoring, feature importance, and XGBoost's JSON model format.

:meth:`Ensemble.to_xgboost` writes the model as XGBoost (>= 2.0) saves one, so that
``xgboost.Booster(model_file=path)`` loads it and scores the same rows to the same values (the
splits compare float32 values as XGBoost does; leaf values are float32 there, float64 here: the
difference is float rounding, reported by ``benchmarks/gbdt.py``). TreeSHAP contributions
(``predict(..., pred_contribs=True)``) need the nodes' hessian sums: a model fitted with
``keep_hessians=false`` has none, and XGBoost's contributions are then not meaningful.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from learners.gbdt.trees import XGB_OBJECTIVE, Tree, softmax

FORMAT = "fedsilo-gbdt-v1"


@dataclass
class Ensemble:
    """Trees (one per class and round, round-major), base margins, cut points and names."""

    trees: list[Tree]
    base: list[float]
    cuts: list[list[float]]
    names: list[str]
    objective: str
    classes: int
    schema: str | None = None                 # task=tabular: the schema file's text (to read rows to score)
    vocab: dict[str, list[str]] | None = None  # the federation's discovered categories

    def margins(self, x: np.ndarray) -> np.ndarray:
        """Raw scores (rows x outputs) of the feature rows ``x`` (NaN = missing)."""
        out = np.tile(np.asarray(self.base, dtype=np.float64), (x.shape[0], 1))
        for i, t in enumerate(self.trees):
            out[:, i % self.classes] += np.asarray(t.value)[t.leaf_of_values(x)]
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities of the positive class (binary), of each class (multiclass), or values (regression)."""
        m = self.margins(x)
        if self.objective == "binary":
            return 1.0 / (1.0 + np.exp(-m[:, 0]))
        if self.objective == "multiclass":
            return softmax(m)
        return m[:, 0]

    def importance(self) -> dict[str, float]:
        """Total gain of each feature's splits (XGBoost's ``total_gain``), largest first."""
        gain = np.zeros(len(self.names))
        for t in self.trees:
            for n, left in enumerate(t.left):
                if left >= 0:
                    gain[t.feature[n]] += t.gain[n]
        order = np.argsort(-gain, kind="stable")
        return {self.names[i]: float(gain[i]) for i in order if gain[i] > 0}

    # ---- files ----
    def to_dict(self) -> dict[str, Any]:
        """The model as fedsilo's JSON (every node field, float64)."""
        return {"format": FORMAT, "objective": self.objective, "classes": self.classes, "base": self.base,
                "names": self.names, "cuts": self.cuts, "schema": self.schema, "vocab": self.vocab or {},
                "trees": [t.to_dict() for t in self.trees]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ensemble:
        """A model from :meth:`to_dict`'s JSON (ValueError if it is not one)."""
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} model (format {d.get('format')!r})")
        return cls([Tree.from_dict(t) for t in d["trees"]], [float(b) for b in d["base"]], d["cuts"], list(d["names"]),
                   str(d["objective"]), int(d["classes"]), d.get("schema"), d.get("vocab") or {})

    def to_xgboost(self) -> dict[str, Any]:
        """The model in XGBoost's JSON model format (``Booster(model_file=...)`` loads it)."""
        trees = []
        for i, t in enumerate(self.trees):
            n = len(t.left)
            parents = [2147483647] * n
            for p in range(n):
                for c in (t.left[p], t.right[p]):
                    if c >= 0:
                        parents[c] = p
            leaf = [t.left[p] < 0 for p in range(n)]
            trees.append({
                "base_weights": [float(v) for v in t.value], "categories": [], "categories_nodes": [],
                "categories_segments": [], "categories_sizes": [], "default_left": [int(b) for b in t.default_left],
                "id": i, "left_children": list(t.left), "loss_changes": [0.0 if leaf[p] else float(t.gain[p]) for p in range(n)],
                "parents": parents, "right_children": list(t.right),
                "split_conditions": [float(t.value[p]) if leaf[p] else float(np.float32(t.threshold[p])) for p in range(n)],
                "split_indices": [0 if leaf[p] else int(t.feature[p]) for p in range(n)], "split_type": [0] * n,
                "sum_hessian": [float(c) for c in t.cover],
                "tree_param": {"num_deleted": "0", "num_feature": str(len(self.names)), "num_nodes": str(n),
                               "size_leaf_vector": "1"}})
        k = self.classes
        rounds = len(self.trees) // k
        if self.objective == "binary":
            base = [1.0 / (1.0 + np.exp(-self.base[0]))]
            objective: dict[str, Any] = {"name": XGB_OBJECTIVE["binary"], "reg_loss_param": {"scale_pos_weight": "1"}}
        elif self.objective == "regression":
            base = [self.base[0]]
            objective = {"name": XGB_OBJECTIVE["regression"], "reg_loss_param": {"scale_pos_weight": "1"}}
        else:
            base = list(self.base)
            objective = {"name": XGB_OBJECTIVE["multiclass"], "softmax_multiclass_param": {"num_class": str(k)}}
        return {"learner": {
            "attributes": {"fedsilo": FORMAT}, "feature_names": list(self.names),
            "feature_types": ["float"] * len(self.names),
            "gradient_booster": {"model": {
                "cats": {"enc": [], "feature_segments": [], "sorted_idx": []},
                "gbtree_model_param": {"num_parallel_tree": "1", "num_trees": str(len(trees))},
                "iteration_indptr": [r * k for r in range(rounds + 1)], "tree_info": [i % k for i in range(len(trees))],
                "trees": trees}, "name": "gbtree"},
            "learner_model_param": {"base_score": "[" + ",".join(repr(float(np.float32(b))) for b in base) + "]",
                                    "boost_from_average": "1", "num_class": str(k if self.objective == "multiclass" else 0),
                                    "num_feature": str(len(self.names)), "num_target": "1"},
            "objective": objective}, "version": [3, 2, 0]}

    def save(self, folder: Path) -> dict[str, str]:
        """Write ``model.json`` (fedsilo's) and ``model.xgb.json`` (XGBoost's format) into ``folder``; their paths."""
        folder.mkdir(parents=True, exist_ok=True)
        ours, xgb = folder / "model.json", folder / "model.xgb.json"
        ours.write_text(json.dumps(self.to_dict()))
        xgb.write_text(json.dumps(self.to_xgboost()))
        return {"model": str(ours), "xgboost": str(xgb)}
