"""Vertical learning's cryptography: PSI, the sealed channel, packed Paillier inner products."""

from __future__ import annotations

import numpy as np
import pytest
from phe import paillier

from vertical import channel, psi
from vertical import paillier_rows as pr
from vertical.data import PartyDataError, check_ids


@pytest.fixture(scope="module")
def keypair():
    return paillier.generate_paillier_keypair(n_length=2048)


def run_psi(a_ids: list[str], b_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    a, b = psi.new_scalar(), psi.new_scalar()
    domain = b"test-run"
    xa, xb = psi.blind_ids(a_ids, a, domain), psi.blind_ids(b_ids, b, domain)
    own, peers = psi.intersect([(psi.reblind(xa, b, "a"), psi.reblind(xb, a, "b"))])
    return own, peers[0]


def test_psi_finds_exactly_the_common_ids_aligned():
    a_ids = [f"cust-{i}" for i in range(0, 300)]
    b_ids = [f"cust-{i}" for i in range(200, 450)][::-1]
    own, peer = run_psi(a_ids, b_ids)
    assert sorted(a_ids[i] for i in own) == sorted(set(a_ids) & set(b_ids))
    assert [a_ids[i] for i in own] == [b_ids[j] for j in peer]  # the same customer at every position


def test_psi_blinded_points_reveal_no_id_and_depend_on_the_secret():
    ids = ["alice", "bob"]
    one, two = psi.blind_ids(ids, psi.new_scalar(), b"d"), psi.blind_ids(ids, psi.new_scalar(), b"d")
    assert len(one) == 2 * psi.WIDTH and one != two
    assert b"alice" not in one
    # blinding commutes: a(bH) == b(aH)
    a, b = psi.new_scalar(), psi.new_scalar()
    assert psi.reblind(psi.blind_ids(ids, a, b"d"), b, "x") == psi.reblind(psi.blind_ids(ids, b, b"d"), a, "x")


def test_psi_rejects_malformed_points():
    with pytest.raises(psi.PSIError, match="whole number"):
        psi.reblind(b"\x01" * 33, psi.new_scalar(), "party B's ids")
    bad = b"\xff" * 32  # x >= p: not a coordinate of the curve
    with pytest.raises(psi.PSIError, match="not a point of P-256"):
        psi.reblind(bad, psi.new_scalar(), "party B's ids")


def test_ids_must_be_unique_and_present():
    lines = np.arange(2, 6)
    with pytest.raises(PartyDataError, match=r"id '7' appears more than once \(rows 3 and 5\)"):
        check_ids(np.array(["5", "7", "8", "7"], dtype=object), "bank.csv", lines)
    with pytest.raises(PartyDataError, match="id at row 4 is empty"):
        check_ids(np.array(["5", "7", " ", "9"], dtype=object), "bank.csv", lines)


def test_channel_seals_for_the_peer_only():
    a, b, c = channel.new_secret(), channel.new_secret(), channel.new_secret()
    ab = channel.Channel.between(a, channel.public_of(b), "bank", "platform", "run1")
    ba = channel.Channel.between(b, channel.public_of(a), "platform", "bank", "run1")
    assert ab.fingerprint() == ba.fingerprint()
    sealed = ab.seal(b"positions", "psi-train")
    assert b"positions" not in sealed
    assert ba.open(sealed, "psi-train") == b"positions"
    with pytest.raises(channel.ChannelError):
        ba.open(sealed, "nn-grad")  # another message kind
    cb = channel.Channel.between(c, channel.public_of(a), "platform", "bank", "run1")
    with pytest.raises(channel.ChannelError):
        cb.open(sealed, "psi-train")  # a third key
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(channel.ChannelError):
        ba.open(tampered, "psi-train")


def test_codec_layout_fits_the_key():
    c = pr.RowCodec()
    assert (2 * c.rows_per_ciphertext - 1) * c.slot_bits + c.mask_bits < c.key_bits - 1
    assert c.rows_per_ciphertext >= 20
    for v in (0, 5, -5, (1 << (c.slot_bits - 1)) - 1, -(1 << (c.slot_bits - 1)) + 1):
        low = sum(k * (1 << (i * c.slot_bits)) for i, k in enumerate([3, -7]))
        packed = low + v * (1 << ((c.rows_per_ciphertext - 1) * c.slot_bits))
        assert c.coefficient(packed) == v


@pytest.mark.parametrize("rows", [1, 23, 50, 301])
def test_encrypted_inner_products_are_exact(keypair, rows):
    public, private = keypair
    c = pr.RowCodec()
    rng = np.random.default_rng(rows)
    d, u = c.quantise_d(rng.normal(size=rows)), c.quantise_d(rng.normal(size=rows) / 3)
    x = c.quantise_x(rng.normal(size=(rows, 3)) * 2)
    cts = pr.add_plain(public, pr.encrypt_packed(private, c.pack_rows(d)), c.pack_rows(u))
    assert len(cts) == c.ciphertexts(rows)
    masked, masks = pr.mask(public, pr.inner_products(public, cts, c.exponents(x)), c)
    seen = pr.decrypt(private, masked)
    got = pr.unmask(seen, masks, public.n, c)
    assert np.array_equal(got, ((d + u)[:, None] * x).sum(0) / c.scale)
    # the key owner's decryptions are masked: none equals the plain inner product's polynomial
    assert all(abs(pr.signed(v, public.n)) > 1 << ((2 * c.rows_per_ciphertext - 1) * c.slot_bits - 8) for v in seen)


def test_ciphertext_bytes_are_checked(keypair):
    public, private = keypair
    cts = pr.encrypt_packed(private, [1, -2])
    blob = pr.to_bytes(cts, public.n)
    assert pr.from_bytes(blob, public.n, "x") == cts
    with pytest.raises(ValueError, match="whole number"):
        pr.from_bytes(blob[:-1], public.n, "residual ciphertexts")
    with pytest.raises(ValueError, match="outside"):
        pr.from_bytes(b"\x00" * len(blob), public.n, "residual ciphertexts")
