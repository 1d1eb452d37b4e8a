"""Update compression (aggregation/compression/): codecs, error feedback, refusals, the reply checks."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from aggregation import compression as c
from app import config
from core.config import ConfigError
from strategies.config import FedProxConfig, StrategyConfig
from strategies.heterogeneity import plan


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_quantisation_is_unbiased_and_within_one_step(bits: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=1000) * np.repeat([1e-3, 1.0, 30.0, 0.0], [256, 256, 256, 232])
    draws = np.stack([c.dequantise(*c.quantise(x, bits, rng), bits, x.size) for _ in range(400)])
    scale = np.repeat([np.abs(x[i:i + c.BLOCK]).max() for i in range(0, 1000, c.BLOCK)], c.BLOCK)[:1000]
    step = 2 * scale / ((1 << bits) - 1)
    assert np.all(np.abs(draws - x) <= step + 1e-6 * scale)       # each value within one step of its block
    assert np.all(np.abs(draws.mean(axis=0) - x) <= 4 * step / np.sqrt(400) + 1e-9)  # unbiased
    assert np.all(draws[:, 768:] == 0)                             # an all-zero block stays zero
    codes, scales = c.quantise(x, bits, rng)
    assert len(codes) == (1000 if bits == 8 else 500) and len(scales) == 4 * 4


def test_varints_round_trip_and_reject_a_short_list() -> None:
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**31, 5, 2**35 + 3], dtype=np.uint64)
    data = c.varint_encode(values)
    assert len(data) == 1 + 1 + 1 + 2 + 2 + 3 + 5 + 1 + 6
    assert np.array_equal(c.varint_decode(data, values.size), values)
    with pytest.raises(ValueError, match="expected 10"):
        c.varint_decode(data, 10)


def test_topk_sends_the_largest_values_and_randk_the_shared_positions() -> None:
    rng = np.random.default_rng(1)
    u = rng.normal(size=5000)
    comp = c.Compression("topk", keep=0.01, keep_bits=32)
    parts, sent = c.encode(comp, u, rng, seed=7)
    largest = np.sort(np.argsort(-np.abs(u))[:50])
    assert np.array_equal(np.flatnonzero(sent), largest)
    assert np.allclose(sent[largest], u[largest], atol=1e-6)
    assert len(parts["positions"]) < 2 * 50 and len(parts["values"]) == 4 * 50
    rk = c.Compression("randk", keep=0.02, keep_bits=16)
    a = c.encode(rk, u, rng, seed=11)[1]
    b = c.encode(rk, rng.normal(size=5000), rng, seed=11)[1]
    assert np.array_equal(np.flatnonzero(a), np.flatnonzero(b)) and np.count_nonzero(a) == 100
    unbiased = c.encode(c.Compression("randk", keep=0.02, keep_bits=32, error_feedback=False), u, rng, seed=11)[1]
    assert np.allclose(unbiased[np.flatnonzero(a)], 50 * u[np.flatnonzero(a)], rtol=1e-6)  # scaled by 1/keep


@pytest.mark.parametrize("method", ["topk", "randk", "int4"])
def test_error_feedback_loses_nothing_over_rounds(method: str, tmp_path) -> None:  # noqa: ANN001
    """What is sent over rounds plus the residual left equals the sum of the updates (telescoping)."""
    from flwr.app import Context

    from core.state import SiteStore

    comp = c.SiteCompressor(c.Compression(method, keep=0.05))
    store = SiteStore(tmp_path, "job", "site-0")
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    rng = np.random.default_rng(2)
    total_u, total_sent = np.zeros(800), np.zeros(800)
    for rnd in range(1, 6):
        u = rng.normal(size=800)
        _, sent = comp.compress(u, ctx, store, seed=0, site=0, server_round=rnd, positions=rnd)
        total_u += u
        total_sent += sent
    residual = store.load(c.RESIDUAL, 6)["e"].numpy()  # type: ignore[index]
    assert np.allclose(total_sent + residual, total_u, atol=1e-4)
    assert np.abs(residual).max() > 0
    # a resumed round 3 starts from the residual left by round 2, not round 5's
    again = comp.residual(store, ctx, 3, 800)
    assert again.shape == (800,) and not np.allclose(again, residual)


def test_a_malformed_compressed_reply_is_rejected_with_its_reason() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    glob = ArrayRecord({"w": __import__("flwr.app", fromlist=["Array"]).Array(np.zeros((10, 10), np.float32))})
    dec = c.Decompress(__import__("flwr.serverapp.strategy", fromlist=["FedAvg"]).FedAvg(), glob)
    base = dec._base(glob)
    meta = {**c.Compression("int8").to_record(), "base": base, "size": 100}
    good = RecordDict({c.UPDATE_KEY: ArrayRecord({"values": c.raw_array(bytes(100)), "scales": c.raw_array(bytes(4))}),
                       c.META_KEY: ConfigRecord(meta)})
    short = RecordDict({c.UPDATE_KEY: ArrayRecord({"values": c.raw_array(bytes(10)), "scales": c.raw_array(bytes(4))}),
                        c.META_KEY: ConfigRecord(meta)})
    stale = RecordDict({c.UPDATE_KEY: ArrayRecord({"values": c.raw_array(bytes(100)), "scales": c.raw_array(bytes(4))}),
                        c.META_KEY: ConfigRecord({**meta, "base": 99})})
    out = dec.expand([Message(x, dst_node_id=0, message_type="train") for x in (good, short, stale)])
    assert not out[0].has_error() and out[0].content["arrays"]["w"].numpy().shape == (10, 10)
    assert out[1].has_error() and "10 codes" in out[1].error.reason
    assert out[2].has_error() and "no longer has" in out[2].error.reason


@pytest.mark.parametrize(("overrides", "key", "says"), [
    (["aggregation=secagg", "aggregation.compress=topk"], "aggregation.compress", "reveals where its update is large"),
    (["aggregation=paillier", "aggregation.compress=randk"], "aggregation.compress", "aggregation.value_bits"),
    (["aggregation.compress=zip"], "aggregation.compress", "fp16"),
    (["aggregation.compress=topk", "aggregation.keep=0"], "aggregation.keep", "0 < keep <= 1"),
    (["aggregation.keep_bits=12"], "aggregation.keep_bits", "[8, 16, 32]"),
    (["aggregation=secagg", "strategy.buffer=3"], "strategy.buffer", "one cohort starting from one model"),
    (["privacy=central", "strategy.buffer=3"], "strategy.buffer", "privacy=dpsgd"),
    (["strategy=scaffold", "strategy.buffer=3"], "strategy.name", "fedavg or fedprox"),
    (["faults.slow_factor=0.5"], "faults.slow_factor", ">= 1"),
    (["aggregation=secagg", "aggregation.weight_bits=40"], "aggregation.weight_bits", "0 (53 - value_bits) or 1..29"),
])
def test_config_refuses_what_does_not_compose(overrides: list[str], key: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.compose(["task=finance", *overrides])
    assert err.value.key == key and says in str(err.value)


def test_randk_composes_with_secure_aggregation_and_compression_asks_for_site_state() -> None:
    cfg = config.compose(["task=finance", "aggregation=secagg", "aggregation.compress=randk"])
    import aggregation

    assert aggregation.get("secagg").keeps_site_state(cfg.aggregation)
    assert not aggregation.get("plain").keeps_site_state(config.compose(["task=finance"]).aggregation)


def test_slow_sites_are_stragglers_only_when_the_strategy_does_not_wait() -> None:
    wait, partial = StrategyConfig(), FedProxConfig(wait_for_slow=False)
    drop = StrategyConfig(wait_for_slow=False, straggler_policy="drop")
    assert plan(wait, 1, 100, 0, 1, 0, 5, slowdown=5).max_steps is None
    assert plan(partial, 1, 100, 0, 1, 0, 5, slowdown=5).max_steps == 20
    assert plan(drop, 1, 100, 0, 1, 0, 5, slowdown=5).dropped
    assert not plan(drop, 1, 100, 0, 1, 0, 5, slowdown=1).dropped


@pytest.mark.parametrize(("value_bits", "field_bits"), [(24, 53), (8, 24), (4, 12)])
def test_a_short_secagg_field_sums_exactly_and_packs_to_its_bits(value_bits: int, field_bits: int) -> None:
    """Weights, the loss limbs and the clipped-count limbs of several sites sum without wrapping in
    Z_(2^field_bits); the masked vector travels at field_bits bits an element."""
    from aggregation.secagg.vector import WeightedUpdateCodec, pack_field, unpack_field

    codec = WeightedUpdateCodec(1.0, value_bits, 1000, field_bits)
    rng = np.random.default_rng(3)
    weights = [codec.max_weight // 4, codec.max_weight // 4, codec.max_weight // 2 - 1]
    losses, updates = [0.25, 3.5, 1023.9], [rng.uniform(-1.2, 1.2, 1000) for _ in weights]
    vecs = [codec.encode(u, w, loss, rng) for u, w, loss in zip(updates, weights, losses, strict=True)]
    total = np.sum(vecs, axis=0, dtype=np.uint64) & np.uint64((1 << field_bits) - 1)
    agg = codec.decode(total)
    n = sum(weights)
    assert agg.total_weight == n
    assert agg.mean_loss == pytest.approx(sum(w * round(x * 65536) for w, x in zip(weights, losses, strict=True))
                                          / 65536 / n, abs=0)
    assert agg.clipped == sum(int(np.sum(np.abs(u) > 1.0)) for u in updates)
    clipped = [np.clip(u, -1, 1) for u in updates]
    exact = sum(w * u for w, u in zip(weights, clipped, strict=True)) / n
    assert np.abs(agg.mean_update - exact).max() <= codec.field.delta + 1e-12
    y = rng.integers(0, 1 << field_bits, size=1001, dtype=np.uint64)
    packed = pack_field(y, field_bits)
    assert len(packed.data) == -(-1001 * field_bits // 8)
    assert np.array_equal(unpack_field(packed, field_bits), y)
    with pytest.raises(ValueError, match="bytes"):
        unpack_field(type(packed)(dtype="uint64", shape=(1002,), stype=packed.stype, data=packed.data), field_bits)
    with pytest.raises(ValueError, match="weight must be"):
        codec.encode(updates[0], codec.max_weight + 1, 0.1, rng)


def test_topk_keeps_its_share_of_every_array() -> None:
    """Layer-wise top-k: an array of small updates still sends its own largest values."""
    rng = np.random.default_rng(4)
    u = np.concatenate([rng.normal(size=4000) * 10, rng.normal(size=1000) * 1e-3, [5e-4]])
    comp = c.Compression("topk", keep=0.01, keep_bits=32)
    parts, sent = c.encode(comp, u, rng, seed=0, segments=(4000, 1000, 1))
    kept = np.flatnonzero(sent)
    assert len(kept) == 40 + 10 + 1
    assert np.array_equal(kept[40:50], 4000 + np.sort(np.argsort(-np.abs(u[4000:5000]))[:10]))
    assert kept[-1] == 5000
    assert np.array_equal(c.decode(comp, parts, u.size, 0, (4000, 1000, 1)), sent)
    assert np.count_nonzero(c.encode(comp, u, rng, seed=0)[1][4000:]) == 0  # one global top-k would starve them


def test_quantisation_blocks_never_span_two_arrays() -> None:
    """A large value in one array (FedNova's step count) does not coarsen its neighbour's values."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(size=255) * 1e-4, [68.0]])
    for bits in (8, 4):
        alone = c.dequantise(*c.quantise(x, bits, rng, (255, 1)), bits, 256, (255, 1))
        mixed = c.dequantise(*c.quantise(x, bits, rng), bits, 256)
        assert np.abs(alone[:255] - x[:255]).max() <= 2 * 1e-4 * 5 / ((1 << bits) - 1)
        assert alone[255] == 68.0
        assert np.abs(mixed[:255] - x[:255]).max() > 1e-3  # one shared block: 68/127 steps
