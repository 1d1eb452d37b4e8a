"""FedAvg's reply screening and aggregation, on real Flower Message objects."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from core.replies import check_train_reply
from strategies.fedavg import FedAvg

SHAPES = {"w": (3, 2), "b": (2,)}
# In a ServerApp process Flower sets this identity before any Message is built.
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _arrays(value: float, **changes: np.ndarray) -> ArrayRecord:
    arrays = {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}
    arrays.update(changes)
    return ArrayRecord(_to_arrays(arrays))


def _to_arrays(d: dict[str, np.ndarray]) -> dict[str, Array]:
    return {k: Array(v) for k, v in d.items()}


def _reply(node: int, site: int, arrays: ArrayRecord | None, n: float = 10, rnd: int = 1,
           metrics: dict | None = None) -> Message:
    ins = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({"metrics": MetricRecord(metrics or {"num-examples": n, "train_loss": 0.5}),
                          "site": ConfigRecord({"id": site, "name": f"site-{site}", "round": rnd})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, reply_to=ins)


def _strategy() -> FedAvg:
    s = FedAvg(num_sites=3)
    s.reference = {k: (shape, np.dtype(np.float32)) for k, shape in SHAPES.items()}
    return s


def test_weighted_average_of_good_replies() -> None:
    s = _strategy()
    replies = [_reply(11, 0, _arrays(1.0), n=10), _reply(12, 1, _arrays(4.0), n=30)]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((3, 2), (10 * 1 + 30 * 4) / 40))
    assert metrics is not None and metrics["train_loss"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (_reply(13, 2, _arrays(1.0, w=np.full((2, 3), 1.0, np.float32))), "shape"),
        (_reply(13, 2, _arrays(1.0, b=np.array([np.nan, 1.0], np.float32))), "NaN"),
        (_reply(13, 2, _arrays(1.0, b=np.ones(2, np.float64))), "dtype"),
        (_reply(13, 2, ArrayRecord(_to_arrays({"w": np.ones((3, 2), np.float32)}))), "array names"),
        (_reply(13, 2, None), "ArrayRecord"),
        (_reply(13, 2, _arrays(1.0), rnd=7), "round 7"),
        (_reply(13, 2, _arrays(1.0), metrics={"train_loss": 0.1}), "num-examples"),
        (_reply(13, 2, _arrays(1.0), n=0), "num-examples"),
        (_reply(13, 2, _arrays(1.0), metrics={"num-examples": float("inf")}), "finite"),
        (_reply(13, 2, _arrays(1.0), metrics={"num-examples": 10, **{f"m{i}": 0.0 for i in range(40000)}}),
         "oversized reply"),
    ],
)
def test_malformed_reply_is_rejected_and_the_round_goes_on(bad: Message, reason: str) -> None:
    s = _strategy()
    assert reason in (check_train_reply(bad, s.reference, 1) or "")
    good = [_reply(11, 0, _arrays(1.0), n=10), _reply(12, 1, _arrays(3.0), n=10)]
    arrays, _ = s.aggregate_train(1, [good[0], bad, good[1]])
    assert arrays is not None
    np.testing.assert_allclose(arrays["b"].numpy(), [2.0, 2.0])
    entry = s.participation[1]["train"]
    assert entry["replied"] == 2 and len(entry["rejected"]) == 1
    assert "site-2" in entry["rejected"][0]["site"] and reason in entry["rejected"][0]["reason"]


def test_error_replies_are_skipped_and_all_bad_keeps_the_model() -> None:
    s = _strategy()
    ins = Message(RecordDict(), dst_node_id=5, message_type="train")
    err = Message(Error(code=0, reason="boom"), reply_to=ins)
    assert s.aggregate_train(1, [err]) == (None, None)
    assert "boom" in s.participation[1]["train"]["rejected"][0]["reason"]


def test_aggregation_order_does_not_depend_on_arrival_order() -> None:
    rng = np.random.default_rng(0)
    replies = [
        _reply(100 + i, i, ArrayRecord(_to_arrays({k: rng.normal(size=sh).astype(np.float32) for k, sh in SHAPES.items()})),
               n=float(rng.integers(5, 50)))
        for i in range(3)
    ]
    a, _ = _strategy().aggregate_train(1, replies)
    b, _ = _strategy().aggregate_train(1, list(reversed(replies)))
    assert a is not None and b is not None
    for k in SHAPES:
        assert np.array_equal(a[k].numpy(), b[k].numpy())


def test_federated_evaluation_pools_counts() -> None:
    s = _strategy()
    def ev(node: int, site: int, tp: int, fp: int, tn: int, fn: int, loss: float) -> Message:
        ins = Message(RecordDict(), dst_node_id=node, message_type="evaluate")
        n = tp + fp + tn + fn
        m = MetricRecord({"num-examples": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "loss": loss,
                          "auc": 0.8, "auc_weight": n})
        return Message(RecordDict({"metrics": m, "site": ConfigRecord({"id": site, "name": "x", "round": 1})}), reply_to=ins)
    out = s.aggregate_evaluate(1, [ev(1, 0, 5, 1, 3, 1, 0.2), ev(2, 1, 0, 2, 8, 0, 0.4)])
    assert out is not None
    assert out["accuracy"] == pytest.approx((5 + 3 + 8) / 20)
    assert out["sensitivity"] == pytest.approx(5 / 6)
    assert out["loss"] == pytest.approx(0.3)


class _Grid:
    """Just enough of a Grid for node tracking: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_a_site_that_leaves_is_named_and_recorded() -> None:
    s = _strategy()
    s.aggregate_train(1, [_reply(11, 0, _arrays(1.0)), _reply(12, 1, _arrays(1.0))])  # learns the names
    s._track_nodes(1, _Grid([11, 12]))
    s._track_nodes(2, _Grid([11]))
    left = s.participation[2]["left"]
    assert [(e["site"], e["node"]) for e in left] == [("site-1", 12)] and left[0]["noticed"]


def test_superlink_error_for_an_unreachable_node_names_the_site() -> None:
    """Flower's SuperLink answers for a dead node itself (source node 1); the instruction it
    replies to says which site that was."""
    s = _strategy()
    s.aggregate_train(1, [_reply(11, 0, _arrays(1.0)), _reply(12, 1, _arrays(1.0))])
    ins = Message(RecordDict(), dst_node_id=12, message_type="train")
    ins.metadata.__dict__["_message_id"] = "m-12"
    s._sent = [ins]
    err = Message(Error(code=5, reason="Node Unavailable"), reply_to=ins)
    err.metadata.__dict__["_src_node_id"] = 1
    s.aggregate_train(2, [_reply(11, 0, _arrays(1.0), rnd=2), err])
    assert s.participation[2]["train"]["rejected"] == [{"site": "site-1 (node 12)", "reason": "error reply: Node Unavailable"}]


def test_oversized_config_record_and_evaluate_reply_are_rejected() -> None:
    s = _strategy()
    big = _reply(13, 2, _arrays(1.0))
    big.content["site"]["note"] = "x" * 300_000
    assert "oversized reply" in (check_train_reply(big, s.reference, 1) or "")
    ins = Message(RecordDict(), dst_node_id=13, message_type="evaluate")
    ev = Message(RecordDict({"metrics": MetricRecord({"num-examples": 5, "tp": 1, "fp": 1, "tn": 1, "fn": 2,
                                                      "loss": 0.5, "auc": 0.5, "auc_weight": 5}),
                             "site": ConfigRecord({"id": 2, "name": "site-2", "blob": ["y" * 1000] * 300})}),
                 reply_to=ins)
    assert s.aggregate_evaluate(1, [ev]) is None
    assert "oversized" in s.participation[1]["evaluate"]["rejected"][0]["reason"]



def test_fast_array_reader_equals_flower_and_distrusts_odd_headers() -> None:
    from core.replies import values

    for a in (np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros(0), np.array(2.5), np.ones(3, ">f4"),
              np.asfortranarray(np.ones((3, 2)))):
        arr = Array(a)
        assert np.array_equal(values(arr), arr.numpy()) and values(arr).dtype == arr.numpy().dtype
    forged = Array(np.ones((3, 2), np.float32))
    forged.shape = (2, 3)  # metadata that disagrees with the payload's own header
    assert values(forged).shape == forged.numpy().shape == (3, 2)  # falls back to Flower's reader
    s = _strategy()
    bad = _reply(13, 2, _arrays(1.0))
    bad.content["arrays"]["w"].shape = (2, 3)
    assert "inconsistent" in (check_train_reply(bad, s.reference, 1) or "")
