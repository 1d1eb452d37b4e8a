"""The SecAgg state machines run in memory: exact sums, dropouts, aborts, forgeries."""

from __future__ import annotations

import numpy as np
import pytest

from aggregation.secagg.codec import FieldCodec
from aggregation.secagg.protocol import SecAggAbort, SecAggClient, SecAggServer

N, T, D = 5, 3, 400
CODEC = FieldCodec(clip=2.0, value_bits=20, max_sites=8)
X = np.random.default_rng(7).uniform(-2, 2, size=(N + 1, D))  # X[i] is site i's input (1-based)


def run(drop_before_masking: frozenset[int] = frozenset(), silent_at_unmask: frozenset[int] = frozenset(),
        tamper: bool = False) -> tuple[np.ndarray, int, list[int]]:
    clients = {i: SecAggClient(i, T, CODEC) for i in range(1, N + 1)}
    server = SecAggServer(T, CODEC, D)
    pks = server.collect_keys({i: c.advertise() for i, c in clients.items()})
    inbox = server.route_shares({i: c.share_keys(pks) for i, c in clients.items()})
    if tamper:
        first = next(iter(inbox[2]))
        inbox[2][first] = inbox[3][next(k for k in inbox[3] if k != 2)]  # a share meant for site 3
    masked = {}
    for i, c in clients.items():
        if i in drop_before_masking:
            continue
        enc, _ = CODEC.encode(X[i], np.random.default_rng(i))
        masked[i] = c.masked_input(inbox[i], enc)
    survivors, dropped = server.collect_masked(masked)
    shares = {i: clients[i].unmask(survivors, dropped) for i in survivors if i not in silent_at_unmask}
    total = CODEC.decode_sum(server.unmask(shares), len(survivors))
    return total, len(survivors), survivors


def test_sum_without_dropouts_is_exact_within_the_codec_bound() -> None:
    total, count, survivors = run()
    assert count == N and survivors == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(total, X[1:].sum(0), atol=N * CODEC.delta)


def test_dropped_site_masks_are_removed_and_only_survivors_count() -> None:
    total, count, survivors = run(drop_before_masking=frozenset({2, 4}))
    assert survivors == [1, 3, 5] and count == 3
    np.testing.assert_allclose(total, X[[1, 3, 5]].sum(0), atol=3 * CODEC.delta)


def test_silent_sites_at_unmasking_are_tolerated_down_to_the_threshold() -> None:
    total, _, _ = run(silent_at_unmask=frozenset({1, 5}))
    np.testing.assert_allclose(total, X[1:].sum(0), atol=N * CODEC.delta)


def test_too_few_survivors_abort_the_round() -> None:
    with pytest.raises(SecAggAbort, match="threshold"):
        run(drop_before_masking=frozenset({1, 2, 3}))
    with pytest.raises(SecAggAbort, match="threshold"):
        run(drop_before_masking=frozenset({4}), silent_at_unmask=frozenset({1, 2}))


def test_forged_or_misrouted_share_is_detected() -> None:
    with pytest.raises(SecAggAbort, match="authentication"):
        run(tamper=True)


def test_masked_input_reveals_nothing_of_the_input() -> None:
    client = SecAggClient(1, T, CODEC)
    others = {i: SecAggClient(i, T, CODEC) for i in range(2, N + 1)}
    pks = {1: client.advertise(), **{i: c.advertise() for i, c in others.items()}}
    client.share_keys(pks)
    inbox = {i: c.share_keys(pks)[1] for i, c in others.items()}
    enc, _ = CODEC.encode(X[1], np.random.default_rng(0))
    y = client.masked_input(inbox, enc)
    corr = np.corrcoef(y.astype(np.float64), enc.astype(np.float64))[0, 1]
    assert abs(corr) < 0.2  # 400 values: |corr| < 0.2 is > 4 standard errors from 0
    assert abs(y.astype(np.float64).mean() / CODEC.modulus - 0.5) < 0.1


def test_site_refuses_to_mask_when_too_few_sites_shared_keys() -> None:
    client = SecAggClient(1, T, CODEC)
    pks = {1: client.advertise(), 2: SecAggClient(2, T, CODEC).advertise(), 3: SecAggClient(3, T, CODEC).advertise()}
    client.share_keys(pks)
    with pytest.raises(SecAggAbort, match="1 sites shared keys"):
        client.masked_input({}, CODEC.encode(X[1], np.random.default_rng(0))[0])


def test_unmask_refuses_overlapping_lists() -> None:
    client = SecAggClient(1, T, CODEC)
    with pytest.raises(SecAggAbort, match="both"):
        client.unmask([1, 2, 3], [3])
