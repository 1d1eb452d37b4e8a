"""Read one site's table (CSV or Parquet) and check it against the schema.

Everything is read as text first, so that each cell can be checked with a message naming
the file, the column and the row (CSV rows are counted as lines of the file, the header
being line 1; Parquet rows from 1). :func:`read` returns a :class:`Table` of raw values
(numbers not yet transformed or standardised); :mod:`tasks.tabular.prep` does the rest.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.tabular.schema import Feature, Schema

MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
SUFFIXES = (".csv", ".parquet", ".pq")
OTHER = "(other)"
MISSING_LEVEL = "(missing)"


class SiteInputError(ValueError):
    """A site's file does not fit the schema: the message names the file, the column and the row.

    ``str(err)`` is the whole story, for the site's operator (the value it found included);
    ``err.public`` is what may be sent to the coordinator: file, column and row, never a value or an id."""

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public if public is not None else message


def _bad_cell(text: str, value: object) -> SiteInputError:
    """An error whose ``text`` has ``<value>`` where the cell goes: the site's log has it, the coordinator reads
    'a value'."""
    return SiteInputError(text.replace("<value>", repr(value)), public=text.replace("<value>", "a value"))


@dataclass(frozen=True)
class Table:
    """A site's rows, checked: raw numeric values (NaN = missing), category texts, labels."""

    path: str
    numeric: dict[str, np.ndarray]       # numeric and boolean features: float64, NaN where missing
    categorical: dict[str, np.ndarray]   # categorical features: the cell texts (object), MISSING_LEVEL if missing
    label: np.ndarray                    # binary 0/1, multiclass class index (int64), regression float64,
    #                                      survival rows x (time, event 0/1) float64
    is_test: np.ndarray | None           # the schema's split column: True for 'test' rows
    line: np.ndarray                     # each row's line (CSV) or row number (Parquet) in the file
    ids: np.ndarray | None = None        # the schema's id column (never a feature)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def take(self, idx: np.ndarray) -> Table:
        """The rows ``idx``."""
        return Table(self.path, {k: v[idx] for k, v in self.numeric.items()},
                     {k: v[idx] for k, v in self.categorical.items()}, self.label[idx],
                     None if self.is_test is None else self.is_test[idx], self.line[idx],
                     None if self.ids is None else self.ids[idx])


def _frame(path: Path, where: str):  # type: ignore[no-untyped-def]
    import pandas as pd

    if not path.is_file():
        raise SiteInputError(f"{where} does not exist")
    if path.suffix.lower() not in SUFFIXES:
        raise SiteInputError(f"{where}: unsupported file type {path.suffix!r}; use one of {list(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise SiteInputError(f"{where} is empty (0 bytes)")
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            df = pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001  # pyarrow raises many types for a corrupt file
            raise SiteInputError(f"{where} is not a readable Parquet file: {err}") from err
        return df.astype(object).where(df.notna(), "").astype(str), 1, [str(c) for c in df.columns]
    raw = path.read_bytes()
    try:
        text_head = raw[:65536].decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _bad_cell(f"{where} is not UTF-8 text (byte {err.start} of the file: <value>); save it as UTF-8 CSV",
                        raw[err.start:err.start + 1]) from err
    header = text_head.splitlines()[0] if text_head.strip() else ""
    if not header:
        raise SiteInputError(f"{where} has no header line")
    if "," not in header:
        for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "pipes")):
            if sep in header:
                raise SiteInputError(f"{where}: the header is separated by {name}, not commas; fedsilo reads "
                                     "comma-separated files (save as CSV with ',' as the delimiter)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", skipinitialspace=True)
    except UnicodeDecodeError as err:
        raise SiteInputError(f"{where} is not UTF-8 text ({err}); save it as UTF-8 CSV") from err
    except pd.errors.ParserError as err:
        raise SiteInputError(f"{where} is not well-formed CSV: {err}") from err
    except pd.errors.EmptyDataError as err:
        raise SiteInputError(f"{where} has no columns") from err
    return df, 2, [c.strip() for c in next(csv.reader([header]))]


def _placeholder(schema: Schema) -> str:
    """A label value that reads without error, for rows that have none (scoring)."""
    lab = schema.label
    if lab.kind == "binary":
        return lab.negative[0] if lab.negative else "__negative__"
    return lab.classes[0] if lab.kind == "multiclass" else "0"


def _missing(col: np.ndarray) -> np.ndarray:
    import pandas as pd

    return pd.Series(col, dtype=object).astype(str).str.strip().str.lower().isin(MISSING_TOKENS).to_numpy()


def read(path: str | Path, schema: Schema, labelled: bool = True) -> Table:
    """The site's table in ``path``, checked against ``schema`` (:class:`SiteInputError` otherwise).

    ``labelled=False`` reads rows to score (``fedsilo predict``): the label and split columns
    may be absent (labels then read as 0).
    """
    p = Path(path).expanduser()
    where = f"site file {p}" if labelled else f"file {p}"
    df, first_line, header = _frame(p, where)
    if not labelled:  # the label (and split) are not needed to score rows: whatever is there is not read
        for c in (schema.label.column, schema.split):
            if c:
                df[c] = "train" if c == schema.split else _placeholder(schema)
        header = [*header, *(c for c in (schema.label.column, schema.split) if c and c not in header)]
    cols = [str(c) for c in df.columns]
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise SiteInputError(f"{where}: column(s) {dupes} appear more than once in the header")
    missing = [c for c in schema.columns if c not in cols]
    if missing:
        raise SiteInputError(f"{where}: missing column(s) {missing} named by the schema ({schema.source or 'schema'}); "
                             f"the file has {cols[:12]}{' ...' if len(cols) > 12 else ''}")
    extra = [c for c in cols if c not in schema.columns]
    if extra:
        raise SiteInputError(f"{where}: column(s) {extra} are not in the schema; add them to its features or "
                             "to 'drop' so that nothing is used by accident")
    if len(df) == 0:
        raise SiteInputError(f"{where} has a header but no rows")
    line = np.arange(len(df), dtype=np.int64) + first_line
    cells = {c: df[c].to_numpy(dtype=object) for c in schema.columns}
    miss = {c: _missing(cells[c]) for c in schema.columns}

    labels = [schema.label.column, *([schema.label.event] if schema.label.event else [])]
    used = [*labels, *(f.name for f in schema.features)]
    for c in used:
        if miss[c].all():
            raise SiteInputError(f"{where}: column {c!r} has no values at all (all {len(df)} rows missing)")
    if schema.missing == "drop_row":
        keep = ~np.any([miss[c] for c in used], axis=0)
        if not keep.any():
            raise SiteInputError(f"{where}: every row has a missing value in some column (missing: drop_row)")
        cells = {c: v[keep] for c, v in cells.items()}
        miss = {c: v[keep] for c, v in miss.items()}
        line = line[keep]
    else:
        for c in used if schema.missing == "error" else labels:
            if miss[c].any():
                k = int(np.argmax(miss[c]))
                what = "the label" if c == schema.label.column and not schema.label.event else \
                    f"the label's {'time' if c == schema.label.column else 'event'} column {c!r}" if c in labels else \
                    f"column {c!r}"
                raise SiteInputError(f"{where}: {what} is missing at row {line[k]} (missing: {schema.missing}; "
                                     "use 'missing: drop_row' to skip such rows)")

    numeric: dict[str, np.ndarray] = {}
    categorical: dict[str, np.ndarray] = {}
    for f in schema.features:
        if f.type == "numeric":
            numeric[f.name] = _numbers(cells[f.name], miss[f.name], line, where, f.name)
        elif f.type == "boolean":
            numeric[f.name] = _booleans(cells[f.name], miss[f.name], line, where, f)
        else:
            categorical[f.name] = _categories(cells[f.name], miss[f.name], line, where, f)
    label = _survival(cells, line, where, schema) if schema.label.kind == "survival" else \
        _labels(cells[schema.label.column], line, where, schema)
    is_test = None
    if schema.split:
        s = np.array([str(v).strip().lower() for v in cells[schema.split]], dtype=object)
        bad = ~np.isin(s, ["train", "test"])
        if bad.any():
            k = int(np.argmax(bad))
            raise _bad_cell(f"{where}: column {schema.split!r} (the schema's split) has <value> at row {line[k]}; "
                            "expected 'train' or 'test'", cells[schema.split][k])
        is_test = s == "test"
    if schema.id:
        ids = cells[schema.id]
        _, first, counts = np.unique(ids.astype(str), return_index=True, return_counts=True)
        if (counts > 1).any():
            k = int(first[np.argmax(counts > 1)])
            again = int(np.flatnonzero(ids.astype(str) == str(ids[k]))[1])
            raise _bad_cell(f"{where}: id column {schema.id!r} repeats <value> (rows {line[k]} and {line[again]}); "
                            "each row must be one record", ids[k])
    return Table(str(p), numeric, categorical, label, is_test, line, cells[schema.id] if schema.id else None)


def _numbers(col: np.ndarray, miss: np.ndarray, line: np.ndarray, where: str, name: str) -> np.ndarray:
    import pandas as pd

    parsed = np.array(pd.to_numeric(pd.Series(col, dtype=object).astype(str).str.strip(), errors="coerce"),
                      dtype=np.float64)  # a writable copy
    bad = ~miss & np.isnan(parsed)
    if bad.any():
        k = int(np.argmax(bad))
        raise _bad_cell(f"{where}: column {name!r} is numeric but row {line[k]} holds <value>", str(col[k]).strip())
    inf = ~miss & np.isinf(parsed)
    if inf.any():
        k = int(np.argmax(inf))
        raise _bad_cell(f"{where}: column {name!r} holds <value> at row {line[k]}; values must be finite",
                        str(col[k]).strip())
    parsed[miss] = np.nan
    return parsed


def _booleans(col: np.ndarray, miss: np.ndarray, line: np.ndarray, where: str, f: Feature) -> np.ndarray:
    text = _canon_all(col)
    true, false = np.isin(text, list(f.true)), np.isin(text, list(f.false))
    bad = ~miss & ~true & ~false
    if bad.any():
        k = int(np.argmax(bad))
        raise _bad_cell(f"{where}: column {f.name!r} is boolean (true: {list(f.true)}, false: {list(f.false)}) "
                        f"but row {line[k]} holds <value>", col[k])
    return np.where(miss, np.nan, true.astype(np.float64))


def _categories(col: np.ndarray, miss: np.ndarray, line: np.ndarray, where: str, f: Feature) -> np.ndarray:
    out = _canon_all(col)
    out[miss] = MISSING_LEVEL
    if f.categories is not None and not f.other:
        bad = ~miss & ~np.isin(out, list(f.categories))
        if bad.any():
            k = int(np.argmax(bad))
            raise _bad_cell(f"{where}: column {f.name!r} holds <value> at row {line[k]}, which is not one of "
                            f"its categories {list(f.categories)} (add it, or set other: true)", col[k])
    return out


def _canon_all(col: np.ndarray) -> np.ndarray:
    """:func:`_canon` of every cell (vectorised for the common all-integer column)."""
    import pandas as pd

    text = pd.Series(col, dtype=object).astype(str).str.strip()
    num = np.array(pd.to_numeric(text, errors="coerce"), dtype=np.float64)
    whole = np.isfinite(num) & (np.mod(num, 1) == 0) & (np.abs(num) < 2**53)
    out = np.array(text.to_numpy(dtype=object), dtype=object)  # a writable copy
    if whole.any():
        out[whole] = num[whole].astype(np.int64).astype(str).astype(object)
    return out


def _canon(v: object) -> str:
    """A cell's text as schema values are written: '2.0' and '2' are the same category."""
    text = str(v).strip()
    try:
        x = float(text)
    except ValueError:
        return text
    return str(int(x)) if np.isfinite(x) and x.is_integer() else text


def _survival(cells: dict[str, np.ndarray], line: np.ndarray, where: str, schema: Schema) -> np.ndarray:
    """A survival label: rows x (time, event), time >= 0 and event 1 (an event) or 0 (censored)."""
    lab = schema.label
    assert lab.event is not None
    time = _numbers(cells[lab.column], np.zeros(len(line), bool), line, where, lab.column)
    negative = time < 0
    if negative.any():
        k = int(np.argmax(negative))
        raise _bad_cell(f"{where}: the time column {lab.column!r} holds <value> at row {line[k]}; times are >= 0",
                        cells[lab.column][k])
    texts = _canon_all(cells[lab.event])
    event = np.isin(texts, list(lab.events))
    bad = ~event & ~np.isin(texts, list(lab.censored))
    if bad.any():
        k = int(np.argmax(bad))
        raise _bad_cell(f"{where}: the event column {lab.event!r} holds <value> at row {line[k]}; the schema's values "
                        f"are events {list(lab.events)} and censored {list(lab.censored)}", cells[lab.event][k])
    return np.column_stack([time, event.astype(np.float64)])


def _labels(col: np.ndarray, line: np.ndarray, where: str, schema: Schema) -> np.ndarray:
    lab = schema.label
    if lab.kind == "regression":
        return _numbers(col, np.zeros(col.shape[0], bool), line, where, lab.column)
    texts = _canon_all(col)
    if lab.kind == "binary":
        pos = np.isin(texts, list(lab.positive))
        if lab.negative is not None:
            bad = ~pos & ~np.isin(texts, list(lab.negative))
            if bad.any():
                k = int(np.argmax(bad))
                raise _bad_cell(f"{where}: label {lab.column!r} holds <value> at row {line[k]}; the schema's "
                                f"values are positive {list(lab.positive)} and negative {list(lab.negative)}", col[k])
        return pos.astype(np.int64)
    bad = ~np.isin(texts, list(lab.classes))
    if bad.any():
        k = int(np.argmax(bad))
        raise _bad_cell(f"{where}: label {lab.column!r} holds <value> at row {line[k]}, which is not one "
                        f"of the schema's classes {list(lab.classes)}", col[k])
    index = {c: i for i, c in enumerate(lab.classes)}
    return np.array([index[t] for t in texts], dtype=np.int64)
