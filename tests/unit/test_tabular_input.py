"""Bad site input (task=tabular): every kind gets a message naming the file, the column and, where
it helps, the row; the schema's own mistakes name the schema file and the key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.base import PartitionConfig, TaskConfig
from tasks.tabular.prep import StatLayout
from tasks.tabular.schema import Schema, SchemaError
from tasks.tabular.table import SiteInputError, read
from tasks.tabular.task import TabularTask

SCHEMA = """
format: fedsilo-schema-v1
label: {column: outcome, kind: binary, positive: [yes], negative: [no]}
id: patient
missing: impute
min_rows: 4
features:
  - {name: age, type: numeric}
  - {name: income, type: numeric, transform: log1p}
  - {name: smoker, type: boolean, true: [Y], false: [N]}
  - {name: region, type: categorical, categories: [north, south]}
"""
GOOD = """patient,outcome,age,income,smoker,region
p1,yes,61,52000,Y,north
p2,no,45,31000,N,south
p3,yes,70,,N,north
p4,no,38,45000,Y,south
p5,no,52,28000,N,north
p6,yes,66,61000,Y,south
"""


@pytest.fixture
def schema(tmp_path: Path) -> Schema:
    p = tmp_path / "schema.yaml"
    p.write_text(SCHEMA)
    return Schema.load(p)


def write(tmp_path: Path, text: str, name: str = "site.csv", encoding: str = "utf-8") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


def fails(path: Path, schema: Schema, *parts: str) -> str:
    with pytest.raises(SiteInputError) as err:
        read(path, schema)
    message = str(err.value)
    for part in (str(path), *parts):
        assert part in message, (part, message)
    return message


def test_a_good_file_reads(tmp_path: Path, schema: Schema) -> None:
    t = read(write(tmp_path, GOOD), schema)
    assert len(t) == 6 and t.label.tolist() == [1, 0, 1, 0, 0, 1]
    assert np.isnan(t.numeric["income"][2]) and t.numeric["smoker"].tolist() == [1, 0, 0, 1, 0, 1]
    assert t.categorical["region"][1] == "south" and t.ids is not None and t.ids[0] == "p1"


# ---- one test per kind of bad input ------------------------------------------------------------
def test_missing_file(tmp_path: Path, schema: Schema) -> None:
    fails(tmp_path / "nowhere.csv", schema, "does not exist")


def test_empty_file(tmp_path: Path, schema: Schema) -> None:
    fails(write(tmp_path, ""), schema, "is empty")


def test_header_without_rows(tmp_path: Path, schema: Schema) -> None:
    fails(write(tmp_path, GOOD.splitlines()[0] + "\n"), schema, "no rows")


def test_missing_column(tmp_path: Path, schema: Schema) -> None:
    text = "\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != 2) for line in GOOD.splitlines())
    fails(write(tmp_path, text), schema, "missing column", "'age'")


def test_extra_column(tmp_path: Path, schema: Schema) -> None:
    text = "\n".join(line + (",ssn" if k == 0 else f",{k}") for k, line in enumerate(GOOD.splitlines()))
    fails(write(tmp_path, text), schema, "'ssn'", "not in the schema")


def test_duplicate_header_column(tmp_path: Path, schema: Schema) -> None:
    text = "\n".join(line + (",age" if k == 0 else ",1") for k, line in enumerate(GOOD.splitlines()))
    fails(write(tmp_path, text), schema, "'age'", "more than once")


def test_non_numeric_value(tmp_path: Path, schema: Schema) -> None:
    fails(write(tmp_path, GOOD.replace("p4,no,38", "p4,no,thirty-eight")), schema, "'age'", "row 5", "thirty-eight")


def test_infinite_value(tmp_path: Path, schema: Schema) -> None:
    fails(write(tmp_path, GOOD.replace("p2,no,45", "p2,no,inf")), schema, "'age'", "row 3", "finite")


def test_unseen_label_value(tmp_path: Path, schema: Schema) -> None:
    fails(write(tmp_path, GOOD.replace("p5,no", "p5,maybe")), schema, "'outcome'", "row 6", "maybe")


def test_missing_label(tmp_path: Path, schema: Schema) -> None:
    fails(write(tmp_path, GOOD.replace("p5,no", "p5,")), schema, "label is missing", "row 6")


def test_all_missing_column(tmp_path: Path, schema: Schema) -> None:
    lines = GOOD.splitlines()
    text = "\n".join([lines[0]] + [",".join(v if i != 3 else "" for i, v in enumerate(r.split(","))) for r in lines[1:]])
    fails(write(tmp_path, text), schema, "'income'", "no values at all")


def test_wrong_delimiter(tmp_path: Path, schema: Schema) -> None:
    fails(write(tmp_path, GOOD.replace(",", ";")), schema, "semicolons", "','")


def test_wrong_encoding(tmp_path: Path, schema: Schema) -> None:
    fails(write(tmp_path, GOOD.replace("north", "nörth"), encoding="latin-1"), schema, "not UTF-8")


def test_boolean_value_outside_its_values(tmp_path: Path, schema: Schema) -> None:
    fails(write(tmp_path, GOOD.replace("Y,north", "maybe,north", 1)), schema, "'smoker'", "row 2", "boolean")


def test_category_not_listed(tmp_path: Path, schema: Schema) -> None:
    fails(write(tmp_path, GOOD.replace("N,south", "N,east", 1)), schema, "'region'", "row 3", "east", "other: true")


def test_duplicate_id(tmp_path: Path, schema: Schema) -> None:
    fails(write(tmp_path, GOOD.replace("p5,", "p2,")), schema, "'patient'", "repeats", "'p2'")


def test_log1p_outside_its_domain(tmp_path: Path, schema: Schema) -> None:
    t = read(write(tmp_path, GOOD.replace("28000", "-5")), schema)
    with pytest.raises(SiteInputError, match=r"'income'.*log1p.*row 6"):
        StatLayout(schema, {}).moments(t)


def test_missing_value_under_missing_error(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(SCHEMA.replace("missing: impute", "missing: error"))
    fails(write(tmp_path, GOOD), Schema.load(p), "'income'", "missing at row 4")


def test_unsupported_file_type(tmp_path: Path, schema: Schema) -> None:
    fails(write(tmp_path, GOOD, name="site.xlsx"), schema, "unsupported file type", "'.xlsx'")


def test_corrupt_parquet(tmp_path: Path, schema: Schema) -> None:
    fails(write(tmp_path, "PAR1 not really parquet", name="site.parquet"), schema, "not a readable Parquet")


def test_bad_split_value(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(SCHEMA.replace("id: patient", "id: patient\nsplit: part"))
    text = "\n".join(line + (",part" if k == 0 else (",train" if k != 3 else ",holdout"))
                     for k, line in enumerate(GOOD.splitlines()))
    fails(write(tmp_path, text), Schema.load(p), "'part'", "row 4", "'train' or 'test'")


def test_parquet_reads_like_csv(tmp_path: Path, schema: Schema) -> None:
    import pandas as pd

    csv = write(tmp_path, GOOD)
    pq = tmp_path / "site.parquet"
    pd.read_csv(csv, dtype=str, keep_default_na=False).to_parquet(pq)
    a, b = read(csv, schema), read(pq, schema)
    assert a.label.tolist() == b.label.tolist()
    assert np.array_equal(a.numeric["income"], b.numeric["income"], equal_nan=True)


# ---- sites refused after reading ------------------------------------------------------------------
def _task(tmp_path: Path, text: str, schema_text: str = SCHEMA) -> TabularTask:
    (tmp_path / "schema.yaml").write_text(schema_text)
    folder = tmp_path / "sites"
    folder.mkdir(exist_ok=True)
    (folder / "a.csv").write_text(text)
    cfg = TaskConfig(name="tabular", schema=str(tmp_path / "schema.yaml"), data=str(folder), val_fraction=0.0)
    return TabularTask(cfg, tmp_path)


def test_site_below_min_rows_is_refused(tmp_path: Path) -> None:
    task = _task(tmp_path, GOOD, SCHEMA.replace("min_rows: 4", "min_rows: 50"))
    with pytest.raises(SiteInputError, match=r"a \(.*a\.csv\): \d+ usable rows, below the schema's min_rows=50"):
        task.raw_site(PartitionConfig(name="natural"), 1, 0, 0)


def test_single_class_site_is_refused_unless_allowed(tmp_path: Path) -> None:
    text = GOOD.replace(",no,", ",yes,")
    with pytest.raises(SiteInputError, match="same label"):
        _task(tmp_path, text).raw_site(PartitionConfig(name="natural"), 1, 0, 0)
    allowed = _task(tmp_path, text, SCHEMA + "single_class: allow\n")
    assert len(allowed.raw_site(PartitionConfig(name="natural"), 1, 0, 0).train) > 0


# ---- the schema's own mistakes ---------------------------------------------------------------------
@pytest.mark.parametrize(("change", "key"), [
    (("kind: binary", "kind: ordinal"), "label.kind"),
    (("type: boolean", "type: bool"), "features[2].type"),
    (("transform: log1p", "transform: sqrt"), "features[1].transform"),
    (("missing: impute", "missing: guess"), "missing"),
    (("min_rows: 4", "min_rows: zero"), "min_rows"),
    (("id: patient", "id: patient\nlabels: x"), "labels"),
    (("{name: age, type: numeric}", "{name: outcome, type: numeric}"), "named twice"),
])
def test_schema_errors_name_the_key(tmp_path: Path, change: tuple[str, str], key: str) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(SCHEMA.replace(*change))
    with pytest.raises(SchemaError) as err:
        Schema.load(p)
    assert str(p) in str(err.value) and key in str(err.value)


def test_schema_that_does_not_parse(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("label: {column: x\nfeatures: [")
    with pytest.raises(SchemaError, match="does not parse as YAML"):
        Schema.load(p)


def test_fingerprint_tells_schemas_apart(schema: Schema, tmp_path: Path) -> None:
    p = tmp_path / "other.yaml"
    p.write_text(SCHEMA.replace("categories: [north, south]", "categories: [north, south, east]"))
    assert schema.fingerprint() != Schema.load(p).fingerprint()
    assert schema.fingerprint() == Schema.parse(schema.to_dict()).fingerprint()  # the saved form round-trips
