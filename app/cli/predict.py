"""``fedsilo predict RUN_DIR FILE [--out scores.csv] [--keypair KEYPAIR]``: score raw rows with a run's model.

The run directory holds ``model.fedsilo.npz`` (:mod:`tasks.tabular.artefact`): the model, its
fitted preprocessing and its schema; or, for a sum-based learner (``gbdt``, ``glm``, ``auto``),
``model.json`` (:mod:`learners.predict`).
FILE is a CSV or Parquet file of raw rows with the
schema's feature columns (the label may be absent); it is checked against the schema with
the same messages a site's file gets. Scores go to ``--out`` (default ``FILE.scores.csv``)
with the schema's id column first when FILE has it.

Under ``aggregation=paillier`` the file holds the encrypted model and encrypted statistics:
scoring runs at a site with its key pair (``--keypair``), which decrypts both locally.
Exit codes: 0 scored, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np


def predictor(run_dir: Path, keypair: Path | None = None) -> Any:
    """The run's :class:`~tasks.tabular.artefact.Predictor` (decrypted with ``keypair`` if need be), or a
    sum-based learner's (``gbdt``, ``glm``, ``auto``) :class:`~learners.predict.LearnerPredictor`."""
    from learners import predict as trees
    from tasks.tabular import artefact

    if trees.is_learner_model(run_dir):
        return trees.LearnerPredictor.load(run_dir)

    state, meta = artefact.load(run_dir)
    if not meta.get("encrypted"):
        return artefact.Predictor.from_parts(state, meta)
    if keypair is None:
        raise artefact.ArtefactError("this model is encrypted (aggregation=paillier): only a site with the key "
                                     "pair can use it; pass --keypair PATH")
    return _decrypted(state, meta, keypair)


def _decrypted(state: dict[str, np.ndarray], meta: dict[str, Any], keypair: Path) -> Any:
    """Decrypt the model and the preprocessing totals with the site's key pair, through the run's
    aggregation option's site half (the code every site decrypts with)."""
    import json

    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
    from omegaconf import OmegaConf

    import aggregation
    from tasks.tabular import artefact

    option = aggregation.get(meta["aggregation"]["name"])
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(option.schema), meta["aggregation"]))
    cfg.keypair = str(keypair)  # type: ignore[union-attr]  # an option with encrypted models has a key-pair key
    half = option.site(cfg)
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    sealed = ConfigRecord({k: ([bytes.fromhex(x) for x in v] if k.endswith("-ct") else v)
                           for k, v in meta["sealed"].items()})
    vocab = {k: list(v) for k, v in json.loads(str(sealed["prep-vocab"])).items()}
    prep = artefact.preprocessor(meta, vocab, tuple(half.open_total(context, sealed, "prep-moments")),
                                 tuple(half.open_total(context, sealed, "prep-spread")), str(sealed["prep-standardize"]))
    template = artefact.build(meta).state_dict()
    plain = half.open_model(context, ArrayRecord({k: Array(v) for k, v in state.items()}), template)
    return artefact.Predictor.from_parts({k: v.numpy() for k, v in plain.items()}, meta, prep)


def main(argv: list[str]) -> int:
    """``fedsilo predict RUN_DIR FILE``: score raw rows with a run's model; the exit code."""
    parser = argparse.ArgumentParser(prog="fedsilo predict", description="Score raw rows with a run's model.")
    parser.add_argument("run_dir", type=Path, help="the run directory (or its model.fedsilo.npz)")
    parser.add_argument("file", type=Path, help="CSV or Parquet rows with the schema's feature columns")
    parser.add_argument("--out", type=Path, default=None, help="where to write the scores (CSV)")
    parser.add_argument("--keypair", type=Path, default=None, help="aggregation=paillier: the site's key pair")
    args = parser.parse_args(argv)
    from core import extras

    if args.keypair is not None and (why := extras.message("fedsilo predict --keypair", "paillier")) is not None:
        print(f"fedsilo predict: {why}", file=sys.stderr)
        return 2
    import pandas as pd

    from tasks.tabular.artefact import ArtefactError
    from tasks.tabular.table import SiteInputError

    try:
        pred = predictor(args.run_dir, args.keypair)
        table, scores = pred.score_file(args.file)
    except (ArtefactError, SiteInputError, ValueError) as err:
        print(f"fedsilo predict: {err}", file=sys.stderr)
        return 2
    out = args.out or args.file.with_name(args.file.stem + ".scores.csv")
    frame = pd.DataFrame(scores)
    if table.ids is not None and pred.id_column:
        frame.insert(0, pred.id_column, table.ids)
    frame.to_csv(out, index=False)
    print(f"fedsilo predict: {len(table)} rows scored -> {out}")
    return 0
