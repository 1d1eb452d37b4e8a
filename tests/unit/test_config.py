"""Config composition and validation: bad values fail early, naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from app import config


def test_defaults_and_task_swap() -> None:
    cfg = config.compose()
    assert (cfg.task.name, cfg.strategy.name, cfg.aggregation.name, cfg.privacy.name) == (
        "finance", "fedavg", "plain", "none")
    assert cfg.partition.name == "iid" and config.num_sites(cfg) == 5
    med = config.compose(["task=medical", "num_sites=9"])
    assert med.partition.name == "natural" and config.num_sites(med) == 4  # hospitals
    assert config.compose(["task=medical", "partition=iid"]).partition.name == "iid"


def test_run_config_overrides_string_is_parsed_like_the_command_line() -> None:
    cfg = config.from_run_config({"overrides": "task=finance partition=dirichlet partition.alpha=0.1 'task.hidden=[8,4]'"})
    assert cfg.partition.name == "dirichlet" and cfg.partition.alpha == 0.1
    assert cfg.task.hidden == [8, 4]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("num_rounds=0", "num_rounds"),
        ("num_sites=1", "num_sites"),
        ("seed=-1", "seed"),
        ("task.lr=0", "task.lr"),
        ("task.batch_size=0", "task.batch_size"),
        ("task.val_fraction=1.0", "task.val_fraction"),
        ("task.model=cnn", "task.model"),
        ("task.optimizer=lbfgs", "task.optimizer"),
        ("partition=dirichlet partition.alpha=0", "partition.alpha"),
        ("strategy.fraction_train=0", "strategy.fraction_train"),
    ],
)
def test_out_of_range_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.compose(override.split())
    assert err.value.key == key
    assert key in str(err.value) and "allowed" in str(err.value)


def test_natural_partition_needs_a_natural_split() -> None:
    with pytest.raises(config.ConfigError, match="no natural split"):
        config.compose(["task=medical_imaging", "partition=natural"])


def test_wrong_type_and_unknown_key_fail_at_composition() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        config.compose(["num_rounds=ten"])
    assert "num_rounds" in str(err.value.__cause__) or "num_rounds" in str(err.value)
    with pytest.raises(ConfigCompositionException, match="task.learning_rate"):
        config.compose(["task.learning_rate=0.1"])
    with pytest.raises(MissingConfigException, match="task/banking"):
        config.compose(["task=banking"])


def test_unknown_option_of_a_group_is_named() -> None:
    with pytest.raises(MissingConfigException, match="privacy/laplace"):
        config.compose(["privacy=laplace"])


@pytest.mark.parametrize("override, key", [
    ("aggregation.threshold=0.5", "aggregation.threshold"),
    ("aggregation.clip=0", "aggregation.clip"),
    ("aggregation.value_bits=40", "aggregation.value_bits"),
    ("aggregation.stage_timeout=-1", "aggregation.stage_timeout"),
    ("aggregation.neighbours=3", "aggregation.neighbours"),
    ("faults.drop_rate=1.0", "faults.drop_rate"),
    ("faults.drop_stage=train", "faults.drop_stage"),
    ("aggregation=paillier aggregation.value_bits=4", "aggregation.value_bits"),
    ("aggregation=paillier aggregation.max_sites=2", "aggregation.max_sites"),
    ("aggregation=paillier aggregation.obfuscators=short", "aggregation.obfuscators"),
    ("aggregation=paillier aggregation.decryption=one", "aggregation.decryption"),
    ("aggregation=paillier aggregation.stage_timeout=0", "aggregation.stage_timeout"),
    ("aggregation=plain strategy.robust=geomed", "strategy.robust"),
    ("strategy.robust=median", "strategy.robust"),  # under secagg: no rule can see single updates
    ("aggregation=plain strategy.assumed_byzantine=0.5", "strategy.assumed_byzantine"),
    ("aggregation=plain strategy.norm_bound=-1", "strategy.norm_bound"),
    ("aggregation=paillier strategy.norm_bound=1", "strategy.norm_bound"),
    ("aggregation=plain faults.byzantine_fraction=1", "faults.byzantine_fraction"),
    ("aggregation=plain faults.attack=backdoor", "faults.attack"),
    ("aggregation=plain faults.attack_scale=-2", "faults.attack_scale"),
    ("aggregation=plain faults.crash_after_round=-1", "faults.crash_after_round"),
    ("aggregation=plain privacy=central strategy.robust=krum", "strategy.robust"),
    ("aggregation=plain privacy=dpsgd privacy.target_epsilon=0", "privacy.target_epsilon"),
    ("aggregation=plain privacy=dpsgd privacy.delta=1", "privacy.delta"),
])
def test_secagg_and_fault_options_are_range_checked(override: str, key: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.compose(["aggregation=secagg", *override.split()])
    assert err.value.key == key


def test_secagg_options_exist_only_with_secagg() -> None:
    with pytest.raises(ConfigCompositionException, match="clip"):
        config.compose(["aggregation.clip=2"])


def test_fedsilo_command_rejects_bad_config_before_starting_flower(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "task.lr=-0.5", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "task.lr=-0.5" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "superlink.log").exists()


def test_fedsilo_command_reports_wrong_type_with_the_key(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "num_rounds=abc", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "num_rounds" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_infeasible_partition_is_refused_before_flower_starts(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "partition=dirichlet", "partition.alpha=0.1", "num_sites=10",
         "seed=1", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "partition.alpha" in proc.stderr and "min_partition_size" in proc.stderr
    assert "Traceback" not in proc.stderr and "UserWarning" not in proc.stderr
    assert not (tmp_path / "superlink.log").exists()


def test_missing_data_is_refused_before_flower_starts(tmp_path) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "num_rounds=1", f"data_dir={empty}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "finance data not found" in proc.stderr and "Traceback" not in proc.stderr


def test_more_sites_than_rows_is_refused_before_flower_starts(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "task=medical", "partition=iid", "num_sites=5000",
         f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "num_sites=5000 exceeds the 486 training rows" in proc.stderr and "lower num_sites" in proc.stderr


def test_a_bad_resume_path_is_refused_before_flower_starts(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "task=medical", f"resume={tmp_path / 'gone'}",
         f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no checkpoint there" in proc.stderr and not (tmp_path / "run" / "superlink.log").exists()
