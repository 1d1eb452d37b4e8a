"""privacy=central: DP-FedAvg on the server through Flower's wrapper, accounted across rounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict
from opacus.accountants import RDPAccountant

from app import config
from app.runtime.local_grid import run_inprocess
from privacy.central import PARTICIPATION_KEY, CentralDP
from tests.unit.test_strategy import SHAPES, _arrays, _reply, _strategy


def _wrapped(sigma: float, clip: float) -> CentralDP:
    dp = CentralDP(_strategy(), sigma, clip, num_sites=3, delta=1e-5)
    dp.current_arrays = _arrays(0.0)
    return dp


def test_updates_are_clipped_and_averaged_with_equal_weights() -> None:
    """Noise-free limit: the new model is the unweighted mean of the clipped updates; a bad
    reply and an error reply are dropped without losing the round."""
    dp = _wrapped(1e-9, clip=1.0)
    big, small = _arrays(10.0), _arrays(0.1)  # update norms sqrt(8)*10 (clipped to 1) and sqrt(8)*0.1
    ins = Message(RecordDict(), dst_node_id=14, message_type="train")
    replies = [_reply(11, 0, big, n=1000), _reply(12, 1, small, n=1), _reply(13, 2, _arrays(1.0), rnd=9),
               Message(Error(code=500, reason="boom"), reply_to=ins)]
    arrays, _ = dp.aggregate_train(1, replies)
    assert arrays is not None
    expected = (10.0 / (10.0 * np.sqrt(8)) + 0.1) / 2  # clipped big update + small update, equal weights
    np.testing.assert_allclose(arrays["w"].numpy(), expected, atol=1e-6)
    part = dp.record.to_dict()[1]
    assert part["train"]["replied"] == 2 and len(part["train"]["rejected"]) == 2
    assert part[PARTICIPATION_KEY]["sites"] == 2 and part[PARTICIPATION_KEY]["noise_std"] == pytest.approx(1e-9 / 2)


def test_noise_std_is_sigma_clip_over_sites() -> None:
    dp = _wrapped(2.0, clip=0.5)
    zero = _arrays(0.0)
    draws = []
    for r in range(1, 41):
        arrays, _ = dp.aggregate_train(r, [_reply(11, 0, zero, rnd=r), _reply(12, 1, zero, rnd=r)])
        assert arrays is not None
        draws.append(np.concatenate([arrays[k].numpy().ravel() for k in SHAPES]))
    assert np.std(np.concatenate(draws)) == pytest.approx(2.0 * 0.5 / 2, rel=0.1)


def test_epsilon_matches_opacus_and_budget_stops_training(tmp_path: Path) -> None:
    """Epsilon after each release equals Opacus' RDP accountant stepped with sample rate 1;
    with a target the run stops before exceeding it and keeps its last model."""
    res = run_inprocess(["task=medical", "num_rounds=4", "privacy=central", "privacy.noise_multiplier=2"], tmp_path / "a")
    acc = RDPAccountant()
    for h in res["history"]:
        acc.step(noise_multiplier=2.0, sample_rate=1.0)
        assert h["participation"][PARTICIPATION_KEY]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert res["privacy"]["releases"] == 4
    acc = RDPAccountant()
    for _ in range(2):
        acc.step(noise_multiplier=2.0, sample_rate=1.0)
    target = acc.get_epsilon(1e-5) * 1.01
    res = run_inprocess(["task=medical", "num_rounds=4", "privacy=central", "privacy.noise_multiplier=2",
                         f"privacy.target_epsilon={target}"], tmp_path / "b")
    assert res["status"] == "completed" and res["privacy"]["stopped_at_round"] == 3
    assert res["privacy"]["releases"] == 2 and res["privacy"]["epsilon"] <= target
    assert res["history"][3]["server"]["auc"] == res["history"][1]["server"]["auc"]


def test_central_with_fedprox_runs(tmp_path: Path) -> None:
    res = run_inprocess(["task=medical", "num_rounds=2", "privacy=central", "strategy=fedprox",
                         "privacy.noise_multiplier=0.5"], tmp_path)
    assert res["privacy"]["mechanism"] == "central" and res["history"][-1]["participation"]["mu"] == 0.01


@pytest.mark.parametrize("override, key", [
    ("privacy.noise_multiplier=0", "privacy.noise_multiplier"),
    ("privacy.clipping_norm=-1", "privacy.clipping_norm"),
    ("privacy.target_epsilon=0", "privacy.target_epsilon"),
    ("aggregation=secagg", "aggregation.name"),
    ("aggregation=paillier", "aggregation.name"),
])
def test_bad_central_config_names_the_key(override: str, key: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.compose(["privacy=central", override])
    assert err.value.key == key
