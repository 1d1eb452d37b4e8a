"""Checks that need the data, run before any Flower process starts.

Config validation (:func:`app.config.validate`) catches wrong types and ranges; some
mistakes only show against the data: the data folder lacks a data set, or a Dirichlet
partition cannot give every site ``min_partition_size`` rows. Found here they cost the
user a second and a clear message, instead of a federation whose sites all fail.
"""

from __future__ import annotations

from pathlib import Path

import aggregation
import tasks
from app import config
from app.support.paths import resolve_data_dir


class PreflightError(ValueError):
    """The config cannot work with this data; the message says why and what to change."""


def preflight(cfg: config.FedsiloConfig) -> Path:
    """Check the task's data files, the keys and the checkpoint to resume from; for IID and
    Dirichlet partitions, load the data and make the partition (it fails for more sites than
    rows, and by chance for Dirichlet). Return the resolved data folder.

    Natural splits cannot fail for the bundled data, so they skip the loading here; a
    malformed data file still fails the run with a clear status.
    """
    data_dir = resolve_data_dir(cfg.data_dir)
    if cfg.vertical.name != "none":
        return _check_vertical(cfg, data_dir)
    task_cls = tasks.get(cfg.task.name)
    missing = [f for f in task_cls.data_files if not (data_dir / f).is_file()]
    if missing:
        raise PreflightError(f"{cfg.task.name} data not found in {data_dir}: missing {missing}")
    check_keys(cfg)
    from app.tracking.trackers import missing as tracker_missing

    if (why := tracker_missing(cfg.logger)) is not None:
        raise PreflightError(why)
    if cfg.resume:
        from app.support import checkpoint
        from tasks import learners

        try:
            if learners.get(cfg.learner.name).rounds:
                checkpoint.resumable(cfg.resume, config.to_dict(cfg), cfg.num_rounds)
            else:  # a sum-based learner: its program's progress (learner-checkpoint.json)
                checkpoint.resumable_learner(cfg.resume, config.to_dict(cfg))
        except checkpoint.CheckpointError as err:
            raise PreflightError(str(err)) from err
    try:
        task_cls(cfg.task, data_dir).check_setup(cfg.partition, config.num_sites(cfg), cfg.seed)
    except ValueError as err:  # the task's own words: which key, which file, what to change
        raise PreflightError(str(err)) from err
    return data_dir


def check_keys(cfg: config.FedsiloConfig) -> None:
    """The aggregation option's own checks (``aggregation=paillier``: the optional extra, and key
    files that can be read, are at least 2048 bits, and are one pair)."""
    try:
        aggregation.get(cfg.aggregation.name).preflight(cfg.aggregation)
    except ValueError as err:
        raise PreflightError(str(err)) from err


def _check_vertical(cfg: config.FedsiloConfig, data_dir: Path) -> Path:
    """A simulated vertical federation: every party's files exist (their contents are checked by
    the parties themselves, which refuse a bad file naming it, its column and its row)."""
    import vertical

    if (why := vertical.missing_extra(cfg.vertical.name)) is not None:
        raise PreflightError(why)
    for k, p in enumerate(cfg.vertical.parties):
        files = [("data", p.data), ("schema", p.schema), ("test", p.test)]
        if cfg.vertical.mode == "score" and k < len(cfg.vertical.score):
            files.append(("score", cfg.vertical.score[k]))
        for key, value in files:
            if not value:
                continue
            path = Path(value).expanduser()
            path = path if path.is_absolute() else data_dir / path
            if not path.is_file():
                raise PreflightError(f"vertical.parties[{k}].{key} ({p.name}): {path} does not exist"
                                     if key != "score" else f"vertical.score[{k}] ({p.name}): {path} does not exist")
    return data_dir
