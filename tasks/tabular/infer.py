"""``fedsilo data schema infer FILE``: draft a schema from a site's own file, at the site.

The draft is a starting point to review, never a silent decision: every choice is written
as a comment. Rules: a column named like an id (``id``, ``*_id``, unique text or integers
in every row) is the id; the label is ``--label`` or the last column; a label with two
values is binary (positive = the larger / the one named ``1``, ``yes``, ``true``), up to
``MAX_CLASSES`` integer values multiclass, else regression; a feature with only two values
is boolean, numbers are numeric (``log1p`` suggested for a skewed non-negative column),
text is categorical with its categories *listed* (so that the coordinator does not learn
them: docs/own-data.md). Nothing leaves the machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.tabular.table import MISSING_TOKENS, SiteInputError, _canon_all, _frame

MAX_CLASSES = 10
MAX_CATEGORIES = 50
POSITIVE_WORDS = ("1", "yes", "true", "y", "positive", "default")


def _is_number(values: np.ndarray) -> bool:
    try:
        np.asarray(values, dtype=np.float64)
    except ValueError:
        return False
    return True


def _order(v: str) -> tuple[bool, float, str]:
    """Numbers first, in numeric order, then text."""
    try:
        return False, float(v), v
    except ValueError:
        return True, 0.0, v


def infer(path: str | Path, label: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """(the schema as a dict, a note per decision)."""
    p = Path(path).expanduser()
    df, _, header = _frame(p, f"site file {p}")
    if len(df) == 0:
        raise SiteInputError(f"site file {p} has a header but no rows")
    notes: list[str] = []
    cols = [str(c) for c in df.columns]
    label = label or cols[-1]
    if label not in cols:
        raise SiteInputError(f"site file {p}: --label {label!r} is not a column; columns are {cols}")
    id_col = split_col = None
    missing_any = False
    features: list[dict[str, Any]] = []
    label_spec: dict[str, Any] = {}
    for c in cols:
        raw = df[c].to_numpy(dtype=object)
        present = np.array([str(v).strip().lower() not in MISSING_TOKENS for v in raw])
        missing_any |= not present.all()
        values = _canon_all(raw[present])
        distinct = sorted(set(values), key=_order)
        numeric = _is_number(values)
        if c == label:
            if len(distinct) == 2:
                pos = next((v for v in distinct if str(v).lower() in POSITIVE_WORDS), distinct[-1])
                neg = [v for v in distinct if v != pos]
                label_spec = {"column": c, "kind": "binary", "positive": [pos], "negative": neg}
                notes.append(f"label {c!r}: binary, positive {pos!r} (check it)")
            elif numeric and len(distinct) <= MAX_CLASSES and all(float(v).is_integer() for v in distinct):
                label_spec = {"column": c, "kind": "multiclass", "classes": distinct}
                notes.append(f"label {c!r}: multiclass with classes {distinct} (a class absent here is missing: add it)")
            elif numeric:
                label_spec = {"column": c, "kind": "regression"}
                notes.append(f"label {c!r}: regression ({len(distinct)} distinct values)")
            else:
                label_spec = {"column": c, "kind": "multiclass", "classes": distinct[:MAX_CLASSES]}
                notes.append(f"label {c!r}: text with {len(distinct)} values; drafted as multiclass, check it")
            continue
        unique_all = len(distinct) == len(raw) and present.all()
        if set(str(v).lower() for v in distinct) <= {"train", "test"} and len(distinct) == 2:
            split_col = c
            notes.append(f"{c!r}: split column (its 'test' rows are this site's held-out test rows)")
            continue
        counter = unique_all and numeric and np.array_equal(np.sort(np.asarray(values, float)),
                                                            np.arange(1, len(raw) + 1, dtype=float))
        if id_col is None and (c.lower() == "id" or c.lower().endswith("_id") or (unique_all and not numeric)
                               or counter):
            id_col = c
            notes.append(f"{c!r}: id (never a feature)")
            continue
        if len(distinct) <= 1:
            notes.append(f"{c!r}: a single value here; listed under drop (check it varies at other sites)")
            features.append({"drop": c})
            continue
        if len(distinct) == 2:
            true = next((v for v in distinct if str(v).lower() in POSITIVE_WORDS), distinct[-1])
            features.append({"name": c, "type": "boolean", "true": [true], "false": [v for v in distinct if v != true]})
            notes.append(f"{c!r}: boolean, true = {true!r}")
        elif numeric:
            x = np.asarray(values, dtype=np.float64)
            spec: dict[str, Any] = {"name": c, "type": "numeric"}
            if x.min() >= 0 and np.median(x) > 0 and x.max() > 20 * np.median(x):
                spec["transform"] = "log1p"
                notes.append(f"{c!r}: numeric, skewed (max {x.max():g} > 20 x median {np.median(x):g}): log1p")
            features.append(spec)
        elif len(distinct) <= MAX_CATEGORIES:
            features.append({"name": c, "type": "categorical", "categories": distinct, "other": True})
            notes.append(f"{c!r}: categorical, {len(distinct)} categories listed (+ other)")
        else:
            notes.append(f"{c!r}: text with {len(distinct)} values (free text?): listed under drop")
            features.append({"drop": c})
    drop = [f["drop"] for f in features if "drop" in f]
    schema: dict[str, Any] = {"format": "fedsilo-schema-v1", "label": label_spec}
    if id_col:
        schema["id"] = id_col
    if split_col:
        schema["split"] = split_col
    if drop:
        schema["drop"] = drop
    schema["missing"] = "impute" if missing_any else "error"
    schema["min_rows"] = 20
    schema["features"] = [f for f in features if "drop" not in f]
    if missing_any:
        notes.append("missing values found: missing: impute (the federated mean; drop_row skips such rows)")
    del header
    return schema, notes


def to_yaml(schema: dict[str, Any], notes: list[str], source: str) -> str:
    """The drafted schema as commented YAML for a person to review."""
    import yaml

    lines = [f"# fedsilo schema drafted from {source} by `fedsilo data schema infer`: review every line.",
             *(f"#   {n}" for n in notes)]
    body = yaml.safe_dump(schema, sort_keys=False, default_flow_style=None, width=120)
    return "\n".join(lines) + "\n" + body
