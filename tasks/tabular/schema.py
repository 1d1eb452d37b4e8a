"""The schema of a site's table: which column is the label, which are features and how.

A schema is a small YAML file every site of a federation holds, identical everywhere
(its :meth:`Schema.fingerprint` is compared before round 1; a site with another schema is
refused). Example (``tasks/data/schemas/heart.yaml``)::

    format: fedsilo-schema-v1
    label: {column: num, kind: binary, positive: [1, 2, 3, 4], negative: [0]}   # negative: rest = all others
    # survival: label: {column: time, event: status, kind: survival, events: [1], censored: [0]}
    id: patient_id            # optional; never a feature
    drop: [slope, ca, thal]   # columns read but not used
    split: split              # optional: a column of 'train'/'test' values that fixes the held-out rows
    missing: drop_row         # impute (numeric: the federated mean; categorical: a 'missing' level) | drop_row | error
    min_rows: 20              # a site with fewer usable rows is refused (tiny sites leak through their updates)
    single_class: refuse      # refuse | allow a site whose training rows all have one class (it reveals them)
    standardize: numeric      # numeric | all: booleans and one-hot codes standardised too
    features:
      - {name: age, type: numeric}
      - {name: oldpeak, type: numeric, transform: signed_log1p}
      - {name: sex, type: boolean, true: [1]}
      - {name: cp, type: categorical, categories: [1, 2, 3, 4], drop_first: true}
      - {name: education, type: categorical}     # categories discovered from the sites (docs/own-data.md)

Numeric features are transformed (``none``, ``log1p``, ``signed_log1p``) and standardised
with the federated mean and standard deviation; booleans become 0/1; categoricals become
one-hot codes over the listed (or federally discovered) categories, with ``other: true``
adding one code for values outside the list.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "fedsilo-schema-v1"
LABEL_KINDS = ("binary", "multiclass", "regression", "survival")
FEATURE_TYPES = ("numeric", "categorical", "boolean")
TRANSFORMS = ("none", "log1p", "signed_log1p")
MISSING = ("impute", "drop_row", "error")


class SchemaError(ValueError):
    """A schema file that does not parse, or names a key or value that is not allowed."""


def _text(value: Any) -> str:
    """Values are compared as text: ``1``, ``1.0`` and ``"1"`` in a CSV all read as the text of the cell."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Feature:
    """One feature of a schema: its column, type, transform and categories."""

    name: str
    type: str = "numeric"
    transform: str = "none"
    categories: tuple[str, ...] | None = None   # categorical: the levels (None = discovered federally)
    other: bool = False                         # categorical: one extra code for values outside the levels
    drop_first: bool = False                    # categorical: drop the first level's code (as pd.get_dummies)
    true: tuple[str, ...] = ("1", "true", "yes")  # boolean: the values that mean true (the rest of false)
    false: tuple[str, ...] = ("0", "false", "no")


@dataclass(frozen=True)
class Label:
    """The schema's label: its column, kind, and the values of each class."""

    column: str
    kind: str = "binary"
    positive: tuple[str, ...] = ("1",)          # binary: the values of the positive class
    negative: tuple[str, ...] | None = ("0",)   # binary: the values of the negative class (None: all others)
    classes: tuple[str, ...] = ()               # multiclass: the classes, in order
    event: str | None = None                    # survival: the event column (``column`` is the time column)
    events: tuple[str, ...] = ("1",)            # survival: the event column's values of an event (others: censored)
    censored: tuple[str, ...] = ("0",)          # survival: its values of a censored time


@dataclass(frozen=True)
class Schema:
    """A site table's schema: label, features, id and split columns, and the rules a site is refused by."""

    label: Label
    features: tuple[Feature, ...]
    id: str | None = None
    drop: tuple[str, ...] = ()
    split: str | None = None
    missing: str = "impute"
    min_rows: int = 20
    single_class: str = "refuse"   # refuse | allow: a site whose training rows all have one class
    standardize: str = "numeric"   # numeric: numeric features only | all: booleans and one-hot codes too
    source: str = field(default="", compare=False)

    # ---- derived ---------------------------------------------------------------------------
    @property
    def columns(self) -> tuple[str, ...]:
        """Every column a site file must have, in schema order."""
        extra = [c for c in (self.label.event, self.id, self.split) if c]
        return (self.label.column, *extra, *(f.name for f in self.features), *self.drop)

    def feature(self, name: str) -> Feature:
        """The feature named ``name``."""
        return next(f for f in self.features if f.name == name)

    def discovered(self) -> tuple[str, ...]:
        """Categorical features whose levels the sites discover together (not listed here)."""
        return tuple(f.name for f in self.features if f.type == "categorical" and f.categories is None)

    def to_dict(self) -> dict[str, Any]:
        """The schema as a plain dict (what the model file keeps)."""
        d = asdict(self)
        d.pop("source")
        if self.label.kind != "survival":  # the survival keys only where they mean something (fingerprints unchanged)
            for key in ("event", "events", "censored"):
                d["label"].pop(key)
        if d["label"]["negative"] is None:
            d["label"]["negative"] = "rest"
        return json.loads(json.dumps({"format": FORMAT, **d}))  # plain lists and dicts, as YAML or JSON give them

    def fingerprint(self) -> str:
        """SHA-256 of the canonical schema: equal at every site, or the site is refused."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:24]

    # ---- parsing ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Schema:
        """Read and check a schema file; :class:`SchemaError` naming the file and the key otherwise."""
        import yaml

        p = Path(path).expanduser()
        if not p.is_file():
            raise SchemaError(f"schema file {p} does not exist")
        try:
            raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_loader())  # noqa: S506 - a SafeLoader subclass
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise SchemaError(f"schema file {p} does not parse as YAML: {err}") from err
        return cls.parse(raw, str(p))

    @classmethod
    def parse(cls, raw: Any, source: str = "<schema>") -> Schema:
        """The schema of parsed YAML ``raw``; SchemaError naming ``source`` and the key otherwise."""
        def fail(key: str, msg: str) -> SchemaError:
            return SchemaError(f"{source}: {key}: {msg}")

        if not isinstance(raw, dict):
            raise fail("(top level)", "expected a mapping with 'label' and 'features'")
        known = {"format", "label", "features", "id", "drop", "split", "missing", "min_rows", "single_class",
                 "standardize"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise fail(str(unknown[0]), f"unknown key; allowed keys are {sorted(known)}")
        if raw.get("format", FORMAT) != FORMAT:
            raise fail("format", f"{raw.get('format')!r} is not {FORMAT!r}")
        label = _label(raw.get("label"), fail)
        feats = raw.get("features")
        if not isinstance(feats, list) or not feats:
            raise fail("features", "expected a non-empty list of {name, type, ...} entries")
        features = tuple(_feature(f, k, fail) for k, f in enumerate(feats))
        missing = raw.get("missing", "impute")
        if missing not in MISSING:
            raise fail("missing", f"{missing!r} is not one of {list(MISSING)}")
        min_rows = raw.get("min_rows", 20)
        if not isinstance(min_rows, int) or isinstance(min_rows, bool) or min_rows < 1:
            raise fail("min_rows", f"{min_rows!r} is not an integer >= 1")
        single = raw.get("single_class", "refuse")
        if single not in ("refuse", "allow"):
            raise fail("single_class", f"{single!r} is not one of ['refuse', 'allow']")
        standardize = raw.get("standardize", "numeric")
        if standardize not in ("numeric", "all"):
            raise fail("standardize", f"{standardize!r} is not one of ['numeric', 'all']")
        drop = raw.get("drop") or []
        if not isinstance(drop, list):
            raise fail("drop", "expected a list of column names")
        schema = cls(label, features, _opt_str(raw.get("id"), "id", fail), tuple(map(str, drop)),
                     _opt_str(raw.get("split"), "split", fail), missing, min_rows, single, standardize, source)
        seen: set[str] = set()
        for c in schema.columns:
            if c in seen:
                raise fail("features", f"column {c!r} is named twice (label, id, split, features and drop "
                                       "must be distinct)")
            seen.add(c)
        return schema


def _loader() -> type:
    """PyYAML's SafeLoader with YAML 1.2 booleans: ``yes``, ``no``, ``on``, ``off`` stay text (label values
    such as ``positive: [yes]`` mean what they say); only ``true`` and ``false`` are booleans."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
                                      for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    return Loader


def _opt_str(v: Any, key: str, fail: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise fail(key, f"{v!r} is not a column name")
    return v


def _values(v: Any, key: str, fail: Any) -> tuple[str, ...]:
    items = v if isinstance(v, list) else [v]
    if not items or any(isinstance(x, (dict, list)) or x is None for x in items):
        raise fail(key, f"{v!r} is not a value or a list of values")
    return tuple(_text(x) for x in items)


def _label(raw: Any, fail: Any) -> Label:
    if not isinstance(raw, dict) or "column" not in raw:
        raise fail("label", "expected {column: NAME, kind: binary|multiclass|regression, ...}")
    allowed = ["column", "kind", "positive", "negative", "classes", "event", "events", "censored"]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise fail(f"label.{unknown[0]}", f"unknown key; allowed: {', '.join(allowed)}")
    kind = raw.get("kind", "binary")
    if kind not in LABEL_KINDS:
        raise fail("label.kind", f"{kind!r} is not one of {list(LABEL_KINDS)}")
    if kind == "survival":
        event = _opt_str(raw.get("event"), "label.event", fail)
        if not event or event == raw["column"]:
            raise fail("label.event", "a survival label names its time column (column) and its event column "
                       "(event), e.g. {column: time, event: status, kind: survival}")
        events = _values(raw.get("events", 1), "label.events", fail)
        censored = _values(raw.get("censored", 0), "label.censored", fail)
        if set(events) & set(censored):
            raise fail("label.censored", f"{list(censored)} overlaps the event values {list(events)}")
        return Label(str(raw["column"]), kind, (), None, (), event, events, censored)
    stray = sorted({"event", "events", "censored"} & set(raw))
    if stray:
        raise fail(f"label.{stray[0]}", f"only a survival label (kind: survival) has an event column; this one is {kind}")
    positive = _values(raw.get("positive", 1), "label.positive", fail) if kind == "binary" else ()
    negative: tuple[str, ...] | None = None
    if kind == "binary":
        if "negative" in raw:
            negative = None if raw["negative"] == "rest" else _values(raw["negative"], "label.negative", fail)
        elif "positive" not in raw:
            negative = ("0",)
        if negative is not None and set(negative) & set(positive):
            raise fail("label.negative", f"{list(negative)} overlaps the positive values {list(positive)}")
    classes: tuple[str, ...] = ()
    if kind == "multiclass":
        if "classes" not in raw:
            raise fail("label.classes", "a multiclass label lists its classes, e.g. classes: [0, 1, 2, 3, 4]")
        classes = _values(raw["classes"], "label.classes", fail)
        if len(classes) < 3 or len(set(classes)) != len(classes):
            raise fail("label.classes", f"{list(classes)}: expected 3 or more distinct classes (2: use kind: binary)")
    return Label(str(raw["column"]), kind, positive, negative, classes)


def _feature(raw: Any, k: int, fail: Any) -> Feature:
    key = f"features[{k}]"
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or "name" not in raw:
        raise fail(key, "expected {name: COLUMN, type: numeric|categorical|boolean, ...}")
    raw = {_text(k): v for k, v in raw.items()}  # YAML reads the keys true: and false: as booleans
    allowed = {"name", "type", "transform", "categories", "other", "drop_first", "true", "false"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise fail(f"{key}.{unknown[0]}", f"unknown key; allowed: {sorted(allowed)}")
    ftype = raw.get("type", "numeric")
    if ftype not in FEATURE_TYPES:
        raise fail(f"{key}.type", f"{ftype!r} is not one of {list(FEATURE_TYPES)} (feature {raw['name']!r})")
    transform = raw.get("transform", "none")
    if transform not in TRANSFORMS or (transform != "none" and ftype != "numeric"):
        raise fail(f"{key}.transform", f"{transform!r}: numeric features take one of {list(TRANSFORMS)}")
    cats = raw.get("categories")
    categories = None if cats is None else _values(cats, f"{key}.categories", fail)
    if categories is not None and len(set(categories)) != len(categories):
        raise fail(f"{key}.categories", f"{list(categories)} lists a category twice")
    for flag in ("other", "drop_first"):
        if not isinstance(raw.get(flag, False), bool):
            raise fail(f"{key}.{flag}", f"{raw[flag]!r} is not true or false")
    feature = Feature(str(raw["name"]), ftype, transform, categories, raw.get("other", False),
                      raw.get("drop_first", False))
    if ftype == "boolean":
        true = _values(raw.get("true", list(feature.true)), f"{key}.true", fail)
        false = _values(raw["false"], f"{key}.false", fail) if "false" in raw else \
            tuple(v for v in feature.false if v not in true)
        feature = Feature(feature.name, ftype, true=true, false=false)
    return feature
