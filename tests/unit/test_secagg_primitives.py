"""Secure-aggregation building blocks: key agreement, mask PRG, field codec, Shamir."""

from __future__ import annotations

import numpy as np
import pytest

from aggregation.secagg import keys, prg, ratchet
from aggregation.secagg.codec import FieldCodec
from aggregation.secagg.shamir import combine_shares, create_shares


def test_epoch_roots_are_symmetric_bound_to_run_channel_and_epoch() -> None:
    """The root two neighbours agree: the same at both ends, different for another run, channel, epoch
    or peer; a malformed peer key is refused."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def pair() -> tuple[X25519PrivateKey, bytes]:
        k = X25519PrivateKey.generate()
        return k, k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    (a, a_pub), (b, b_pub), (_, c_pub) = pair(), pair(), pair()
    root = ratchet.root(a, b_pub, 7, "train", 1, "a", "b")
    assert root == ratchet.root(b, a_pub, 7, "train", 1, "b", "a")
    others = {ratchet.root(a, b_pub, 8, "train", 1, "a", "b"), ratchet.root(a, b_pub, 7, "sum", 1, "a", "b"),
              ratchet.root(a, b_pub, 7, "train", 2, "a", "b"), ratchet.root(a, c_pub, 7, "train", 1, "a", "c")}
    assert root not in others and len(others) == 4
    with pytest.raises(ValueError, match="32 bytes"):
        ratchet.root(a, b_pub[:31], 7, "train", 1, "a", "b")
    assert keys.expand(bytes(16), b"self-mask") != keys.expand(bytes(16), b"other")


def _mask(seed: bytes, length: int, codec: FieldCodec) -> np.ndarray:
    """A mask as the sites and the server use it: the PRG's words, reduced into the field."""
    return codec.reduce(prg.words(seed, length).copy())


def test_masks_are_deterministic_full_key_and_uniform() -> None:
    seed = bytes(range(32))
    codec = FieldCodec(clip=1.0, value_bits=27, max_sites=8)  # Z_(2^30)
    assert codec.bits == 30
    m = _mask(seed, 200_000, codec)
    assert np.array_equal(m, _mask(seed, 200_000, codec))
    other = bytearray(seed)
    other[-1] ^= 1  # a change in the last byte (beyond any 32-bit seed) changes the mask
    assert not np.array_equal(m[:100], _mask(bytes(other), 100, codec))
    assert m.max() < 2**30
    # uniform over Z_(2^30): mean and a 16-bin chi-square, both far inside their 1e-6 tails
    assert abs(m.mean() / 2**30 - 0.5) < 0.005
    counts = np.bincount((m >> np.uint64(26)).astype(np.int64), minlength=16)
    chi2 = float(((counts - m.size / 16) ** 2 / (m.size / 16)).sum())
    assert chi2 < 60
    with pytest.raises(ValueError, match="32 bytes"):
        prg.words(seed[:4], 10)


def test_pairwise_masks_cancel_in_the_field_sum() -> None:
    """Site i adds +PRG(s_ij) for j > i and -PRG(s_ij) for j < i: the masks vanish in the sum."""
    codec = FieldCodec(clip=1.0, value_bits=16, max_sites=8)
    rng = np.random.default_rng(0)
    n, d = 5, 1_000
    seeds = {(i, j): bytes([i, j]) * 16 for i in range(n) for j in range(i + 1, n)}  # each pair's round seed
    updates = rng.uniform(-1, 1, size=(n, d))
    encoded = [codec.encode(u, np.random.default_rng(i))[0] for i, u in enumerate(updates)]
    masked = []
    for i in range(n):  # as a site does: words added and subtracted wrapping mod 2^64, reduced once
        y = encoded[i].copy()
        for j in range(n):
            if i == j:
                continue
            w = prg.words(seeds[min(i, j), max(i, j)], d)
            (np.add if j > i else np.subtract)(y, w, out=y)
        masked.append(codec.reduce(y))
    # each masked vector is a field element; the server sums them and reduces once
    assert all(int(y.max()) < codec.modulus for y in masked)
    total_masked = codec.reduce(np.sum(masked, axis=0, dtype=np.uint64))
    total_plain = codec.reduce(np.sum(encoded, axis=0, dtype=np.uint64))
    assert np.array_equal(total_masked, total_plain)
    # a single masked vector says nothing useful: it is far from the site's own encoding
    assert np.mean(masked[0] == encoded[0]) < 0.01
    np.testing.assert_allclose(codec.decode_sum(total_masked, n), updates.sum(0), atol=n * codec.delta)


def test_codec_error_bound_unbiasedness_and_no_overflow() -> None:
    codec = FieldCodec(clip=0.5, value_bits=12, max_sites=64)
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.5, 0.5, size=(64, 2_000))
    total = np.zeros(2_000, dtype=np.uint64)
    for i, row in enumerate(x):
        enc, clipped = codec.encode(row, np.random.default_rng(100 + i))
        assert clipped == 0 and enc.max() < 2**12
        total = codec.reduce(total + enc)
    decoded = codec.decode_sum(total, 64)
    err = decoded - x.sum(0)
    assert np.max(np.abs(err)) <= 64 * codec.delta  # the documented bound, at max_sites
    assert abs(err.mean()) < 0.05 * codec.delta * 8  # stochastic rounding is unbiased
    # values at the extremes of the range, from all 64 sites, still do not wrap
    edge = codec.decode_sum(codec.encode(np.full(3, 0.5), np.random.default_rng(0))[0] * np.uint64(64), 64)
    np.testing.assert_allclose(edge, 32.0)


def test_codec_reports_clipping_and_rejects_bad_parameters() -> None:
    codec = FieldCodec(clip=1.0, value_bits=8, max_sites=4)
    _, clipped = codec.encode(np.array([0.5, 2.0, -3.0]), np.random.default_rng(0))
    assert clipped == 2
    with pytest.raises(ValueError, match="clip"):
        FieldCodec(clip=0.0)
    with pytest.raises(ValueError, match="exceeds 64"):
        FieldCodec(clip=1.0, value_bits=52, max_sites=2**20)
    with pytest.raises(ValueError, match="count"):
        codec.decode_sum(np.zeros(2, np.uint64), 5)


def test_shamir_share_layout_and_malformed_shares() -> None:
    from aggregation.secagg.shamir import PRIME, VALUE_BYTES

    secret = bytes(range(100, 132))
    ours = create_shares(secret, 3, 6)
    assert [s[:4] for s in ours] == [i.to_bytes(4, "little") for i in range(1, 7)]
    assert all(len(s) == 4 + 2 * VALUE_BYTES for s in ours)  # two 16-byte chunks, one field element each
    assert all(int.from_bytes(s[4:4 + VALUE_BYTES], "little") < PRIME for s in ours)
    assert combine_shares(ours[3:]) == secret
    with pytest.raises(ValueError, match="multiple of 16"):
        create_shares(b"short", 2, 3)
    with pytest.raises(ValueError, match="duplicate"):
        combine_shares([ours[0], ours[0], ours[1]])
    with pytest.raises(ValueError, match="lengths"):
        combine_shares([ours[0], ours[1][:-1], ours[2]])
    outside = ours[2][:4] + PRIME.to_bytes(VALUE_BYTES, "little") + ours[2][4 + VALUE_BYTES:]
    with pytest.raises(ValueError, match="outside the field"):
        combine_shares([ours[0], ours[1], outside])
    zero = (0).to_bytes(4, "little") + ours[0][4:]
    with pytest.raises(ValueError, match="index 0"):
        combine_shares([zero, ours[1], ours[2]])


def test_shamir_any_threshold_subset_reconstructs() -> None:
    import random

    rng = random.Random(7)
    for _ in range(50):
        t = rng.randint(1, 12)
        n = rng.randint(t, 30)
        secret = rng.randbytes(16)
        shares = create_shares(secret, t, n)
        assert combine_shares(rng.sample(shares, t)) == secret
        assert combine_shares(rng.sample(shares, n)[: max(t, 1)]) == secret
    shares = create_shares(bytes(16), 3, 5)  # t - 1 shares do not give the secret back
    try:
        assert combine_shares(shares[:2]) != bytes(16)
    except ValueError:
        pass


def test_shamir_needs_the_threshold() -> None:
    secret = bytes(range(32))
    shares = create_shares(secret, threshold=3, num=5)
    assert combine_shares([shares[0], shares[2], shares[4]]) == secret
    assert combine_shares(shares[1:4]) == secret
    try:
        recovered = combine_shares(shares[:2])
    except ValueError:
        recovered = None
    assert recovered != secret


def test_neighbour_graph_is_a_symmetric_ring_or_complete() -> None:
    from aggregation.secagg.graph import auto_neighbours, neighbourhood

    names = [f"site-{i}" for i in range(30)]
    graph = neighbourhood(b"seed", names, 6)
    assert all(len(graph[n]) == 6 and n not in graph[n] for n in names)
    assert all(n in graph[m] for n in names for m in graph[n])  # symmetric: masks cancel pairwise
    assert neighbourhood(b"seed", names, 29)["site-5"] == frozenset(names) - {"site-5"}
    assert neighbourhood(b"seed", names, 6) == neighbourhood(b"seed", names[::-1], 6)  # the same at every site
    assert neighbourhood(b"seed", names, 6) != neighbourhood(b"seed2", names, 6)  # another epoch, another graph
    assert auto_neighbours(10) == 9 and auto_neighbours(50) == 24 and auto_neighbours(1000) == 40
