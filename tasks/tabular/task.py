"""``task=tabular``: any site's own table, described by a schema, preprocessed federally.

Where the rows come from (``task.data``, relative paths under ``data_dir``):

* one CSV/Parquet file: in simulation, split across ``num_sites`` sites by ``partition``
  (iid or dirichlet); in a deployment each SuperNode's ``data-path`` names its own file;
* a folder of files, one per site (their natural split, ``partition=natural``): site names
  are the file names without extension, in sorted order.

Each site keeps a held-out test split of its own rows: the schema's ``split`` column if
it has one, else a seeded, stratified ``task.test_fraction`` of its rows. Its other rows
are split into training and validation rows as for every task. No process ever pools the
sites' rows: the coordinator has the schema and the federated totals only.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from core.config import check
from tasks.base import PartitionConfig, TaskConfig
from tasks.federated import TEST_SEED, FederatedTask, RawSite, stratified_holdout
from tasks.models import MLP, LogisticRegression
from tasks.tabular.evaluation import Spec
from tasks.tabular.prep import Preprocessor, StatLayout, local_vocab, merge_vocab
from tasks.tabular.schema import Schema
from tasks.tabular.table import SUFFIXES, SiteInputError, Table, read


def load_schema(path: str) -> Schema:
    """The schema in ``path``, parsed once per process and content (an edited file is parsed again)."""
    p = Path(path).expanduser()
    return _schema(str(p), p.read_bytes() if p.is_file() else b"")


@lru_cache(maxsize=16)
def _schema(path: str, content: bytes) -> Schema:
    return Schema.load(path)


@lru_cache(maxsize=64)
def _read(path: str, mtime: float, schema: Schema) -> Table:
    return read(path, schema)


def read_table(path: str | Path, schema: Schema) -> Table:
    """A site file, read once per process (re-read when the file changes)."""
    p = Path(path).expanduser()
    return _read(str(p.resolve()), p.stat().st_mtime if p.is_file() else 0.0, schema)


class TabularTask(FederatedTask):
    """A schema-driven task over sites' own tables (MLP or logistic regression)."""

    name: ClassVar[str] = "tabular"
    models: ClassVar[tuple[str, ...]] = ("mlp", "logreg")
    #: a site's own table: a linear model and boosted trees, the lower pooled validation loss chosen (docs/own-data.md)
    default_learner: ClassVar[str] = "auto"

    def path(self, value: str, key: str) -> Path:
        """``task.<key>``'s path, relative to ``data_dir``; a clear error if it is not set."""
        if not value:
            raise ValueError(f"task.{key} is not set: task=tabular needs task.schema=FILE.yaml and task.data=FILE|DIR")
        return super().path(value, key)

    @property
    def schema(self) -> Schema:
        """The schema file's contents (``task.schema``; a deployed site's own file)."""
        return load_schema(str(self.path(self.cfg.schema, "schema")))

    def site_files(self) -> list[Path]:
        """The per-site files of a folder (natural split), sorted by name."""
        p = self.path(self.cfg.data, "data")
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in SUFFIXES) if p.is_dir() else []
        if p.is_dir() and not files:
            raise SiteInputError(f"task.data folder {p} holds no {list(SUFFIXES)} files (one per site)")
        return files

    def read_site(self, path: str | Path) -> Table:
        """One site's checked rows (cached per process)."""
        return read_table(path, self.schema)

    @property
    def outputs(self) -> int:
        """Model outputs: one logit per class (multiclass), else one."""
        lab = self.schema.label
        return len(lab.classes) if lab.kind == "multiclass" else 1

    def build_model(self) -> nn.Module:
        """An MLP or a (multinomial) logistic regression over the preprocessed inputs."""
        if self.width <= 0:
            raise RuntimeError("task=tabular: the model's width is known after federated preprocessing")
        if self.cfg.model == "logreg":  # multinomial logistic regression for multiclass labels, linear for regression
            return LogisticRegression(self.width, self.outputs)
        return MLP(self.width, self.cfg.hidden, self.cfg.dropout, self.outputs)

    @classmethod
    def validate_config(cls, t: TaskConfig, p: PartitionConfig) -> None:
        """Range checks of this task's keys (its files are read, and checked, where the data are)."""
        super().validate_config(t, p)
        check(bool(t.schema), "task.schema", t.schema, "the path of a schema YAML (fedsilo data schema infer FILE)")
        check(bool(t.data), "task.data", t.data, "a CSV/Parquet file, or a folder with one file per site")

    def fingerprint(self) -> str:
        """The schema's fingerprint: equal at every site of a federation, or the site is refused."""
        return self.schema.fingerprint()

    def described_by(self) -> str:
        """The schema file."""
        return self.schema.source

    def discovers(self) -> bool:
        """Whether a vocabulary step (names in the clear) comes before the statistics."""
        return bool(self.schema.discovered())

    def local_vocab(self, rows: list[Any], min_count: int = 1) -> dict[str, list[str]]:
        """The names of the discovered categories in ``rows`` seen at least ``min_count`` times."""
        return local_vocab(rows, self.schema, min_count)

    def merge_vocab(self, parts: list[dict[str, list[str]]]) -> dict[str, list[str]]:
        """The federation's vocabulary from the sites' (sorted, capped by the schema)."""
        return merge_vocab(parts, self.schema)

    def layout(self, vocab: dict[str, list[str]]) -> StatLayout:
        """The statistics of the schema's features for this vocabulary (the preprocessing of rounds of training)."""
        if self.schema.label.kind == "survival":
            raise ValueError("a survival label (time and event) has no training loss for rounds of local training: "
                             "it is analysed by learner.name=survival (the default learner of such a table)")
        return StatLayout(self.schema, vocab)

    def preprocessor(self, vocab: dict[str, list[str]], moments: tuple[float, ...], spread: tuple[float, ...],
                     standardize: str) -> Preprocessor:
        """The schema's transform for these totals."""
        return Preprocessor(self.schema, vocab, moments, spread, standardize)

    def eval_spec(self, bins: int) -> Spec:
        """The pooled test-metric sum of the schema's label."""
        lab = self.schema.label
        return Spec(lab.kind, max(2, len(lab.classes)), bins)

    def artefact_meta(self) -> dict[str, Any]:
        """What the model file keeps to rebuild this task's model and read its inputs."""
        return {"task": self.name, "schema": self.schema.to_dict(), "kind": self.label_kind}


__all__ = ["RawSite", "TEST_SEED", "TabularTask", "load_schema", "read_table", "stratified_holdout"]
