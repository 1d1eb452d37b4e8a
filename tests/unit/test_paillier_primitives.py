"""Paillier building blocks: packing at the range limits, overflow, fast encryption, key files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aggregation.paillier import keys
from aggregation.paillier.crypto import Encryptor, add_ciphertexts, check_ciphertexts
from aggregation.paillier.packing import Packer

PACKER = Packer(clip=2.0, value_bits=16, max_sites=16, plaintext_bits=2047)


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return keys.generate(tmp_path_factory.mktemp("keys"))


def test_layout_matches_the_documented_capacity() -> None:
    assert (PACKER.guard_bits, PACKER.slot_bits, PACKER.slots) == (4, 20, 102)


def test_pack_unpack_round_trips_signed_values_at_the_limits() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([[-2.0, 2.0, -2.0 + 1e-9, 0.0, -5.0, 7.5], rng.uniform(-2, 2, 1000)])
    q, clipped = PACKER.quantise(x)
    assert clipped == 2 and q.min() == 0 and q.max() == (1 << 16) - 1
    assert np.array_equal(PACKER.unpack(PACKER.pack(q), q.size), q)
    back = PACKER.decode_sum(q, 1)
    assert np.all(np.abs(back - np.clip(x, -2, 2)) <= PACKER.delta / 2 + 1e-12)


def test_sum_at_the_maximum_site_count_cannot_overflow() -> None:
    size = 3 * PACKER.slots + 5
    extreme = [np.full(size, (1 << 16) - 1, dtype=np.uint64)]
    vectors = extreme * PACKER.max_sites  # every site at the top of the range
    sums = [sum(col) for col in zip(*(PACKER.pack(v) for v in vectors))]
    assert all(s.bit_length() <= PACKER.plaintext_bits for s in sums)
    assert np.array_equal(PACKER.unpack(sums, size), PACKER.max_sites * extreme[0])
    real = PACKER.decode_sum(PACKER.unpack(sums, size), PACKER.max_sites)
    np.testing.assert_allclose(real, PACKER.max_sites * 2.0)


def test_crt_encryption_is_exactly_paillier(keypair: tuple[Path, Path]) -> None:
    private = keys.load_private(keypair[0])
    enc = Encryptor(private)
    for m, r in [(0, 5), (12345, 987654321), (private.public_key.n - 1, 31337)]:
        assert enc.encrypt(m, enc.obfuscator(r)) == private.public_key.raw_encrypt(m, r_value=r)
    assert private.raw_decrypt(enc.encrypt(424242)) == 424242


@pytest.mark.parametrize("kind", ["full", "djn"])
def test_obfuscators_are_fresh_nth_residues_and_ciphertexts_decrypt(keypair: tuple[Path, Path], kind: str) -> None:
    from aggregation.paillier.crypto import djn_base

    private = keys.load_private(keypair[0])
    public = private.public_key
    enc = Encryptor(private, kind)
    obfs = enc.obfuscators(6)
    assert len(set(obfs)) == 6  # fresh randomness every time
    phi = (private.p - 1) * (private.q - 1)
    for o in obfs:  # an n-th residue mod n^2 has order dividing phi(n); other units do not (almost surely)
        assert 0 < o < public.nsquare and pow(o, phi, public.nsquare) == 1
    assert pow(12345, phi, public.nsquare) != 1  # the check can fail
    for m in (0, 1, 424242, public.n - 1):
        c = enc.encrypt(m)
        assert private.raw_decrypt(c) == m and enc.decrypt(c) == m  # fedsilo's CRT decryption is phe's
    assert enc.decrypt(12345) == private.raw_decrypt(12345)  # on any input, not only valid ciphertexts
    if kind == "djn":  # the public base is a fixed n-th residue every key holder derives alike
        h = djn_base(public.n)
        assert h == djn_base(public.n) and pow(h, phi, public.nsquare) == 1
        assert enc.djn_bits == (public.n.bit_length() + 1) // 2
    else:
        assert enc.residues_by_prime  # keys of two large primes: the exact half-length construction applies
    # a ciphertext of one kind adds to the other's: the two interoperate
    other = Encryptor(private, "djn" if kind == "full" else "full")
    total = add_ciphertexts(public, [[enc.encrypt(40)], [other.encrypt(2)]])
    assert private.raw_decrypt(total[0]) == 42
    with pytest.raises(ValueError, match="aggregation.obfuscators"):
        Encryptor(private, "short")


def test_homomorphic_sum_of_packed_vectors_decodes_to_the_plain_sum(keypair: tuple[Path, Path]) -> None:
    private = keys.load_private(keypair[0])
    public = keys.load_public(keypair[1])
    enc = Encryptor(private)
    rng = np.random.default_rng(2)
    xs = [rng.uniform(-2, 2, 250) for _ in range(5)]
    columns = [[enc.encrypt(p) for p in PACKER.pack(PACKER.quantise(x)[0])] for x in xs]
    total = add_ciphertexts(public, columns)
    sums = PACKER.unpack([private.raw_decrypt(c) for c in total], 250)
    np.testing.assert_allclose(PACKER.decode_sum(sums, 5), np.sum(xs, axis=0), atol=5 * PACKER.delta / 2 + 1e-9)


def test_wrong_key_or_malformed_ciphertexts_are_named(keypair: tuple[Path, Path]) -> None:
    public = keys.load_public(keypair[1])
    good = [Encryptor(keys.load_private(keypair[0])).encrypt(7)]
    assert check_ciphertexts(public, good, 1) is None
    assert "expected 2" in check_ciphertexts(public, good, 2)
    assert "integer in (0, n^2)" in check_ciphertexts(public, [public.nsquare + 5], 1)
    assert "integer in (0, n^2)" in check_ciphertexts(public, ["abc"], 1)
    assert "not a unit" in check_ciphertexts(public, [public.n * 3], 1)


def test_key_files_fail_clearly(keypair: tuple[Path, Path], tmp_path: Path) -> None:
    private_path, public_path = keypair
    assert json.loads(public_path.read_text()).keys() >= {"n", "fingerprint"}
    assert "p" not in json.loads(public_path.read_text())  # the server's file holds no secret
    assert (private_path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(keys.PaillierKeyError, match="does not exist"):
        keys.load_public(tmp_path / "nope.json")
    with pytest.raises(keys.PaillierKeyError, match="not a fedsilo-paillier-keypair"):
        keys.load_private(public_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(keys.PaillierKeyError, match="cannot be read"):
        keys.load_public(tmp_path / "bad.json")
    other_private, other_public = keys.generate(tmp_path / "other")
    with pytest.raises(keys.PaillierKeyError, match="does not belong"):
        keys.check_pair(keys.load_public(other_public), keys.load_private(private_path), other_public, private_path)
    with pytest.raises(keys.PaillierKeyError, match="below the minimum"):
        keys.generate(tmp_path / "small", bits=1024)
    data = json.loads(public_path.read_text())
    data["n"] = hex(int(data["n"], 16) + 2)
    (tmp_path / "altered.json").write_text(json.dumps(data))
    with pytest.raises(keys.PaillierKeyError, match="fingerprint"):
        keys.load_public(tmp_path / "altered.json")


@pytest.mark.slow  # among the heaviest; the full suite runs it (fast tier: README)
def test_fedsilo_keys_command_writes_both_files_and_refuses_short_keys(tmp_path: Path) -> None:
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "app.cli", "keys", "paillier", "--out", str(tmp_path / "k")],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    private = keys.load_private(tmp_path / "k" / keys.PRIVATE_FILE)
    assert keys.load_public(tmp_path / "k" / keys.PUBLIC_FILE).n == private.public_key.n
    short = subprocess.run([sys.executable, "-m", "app.cli", "keys", "paillier", "--out", str(tmp_path / "s"),
                            "--bits", "1024"], capture_output=True, text=True, timeout=120)
    assert short.returncode == 2 and "below the minimum 2048" in short.stderr and "Traceback" not in short.stderr


def test_encrypted_weighted_models_decode_to_fedavg_within_the_bound(keypair: tuple[Path, Path]) -> None:
    from aggregation.paillier.vector import ModelCodec

    private = keys.load_private(keypair[0])
    enc = Encryptor(private)
    codec = ModelCodec(Packer(clip=8.0, value_bits=20, max_sites=16, plaintext_bits=2047), weight_unit=1000, size=500)
    rng = np.random.default_rng(3)
    models = [rng.normal(0, 1, 500) for _ in range(4)]
    rows = [800, 1200, 300, 1500]
    columns, weights = [], []
    for w, n in zip(models, rows):
        plain, clipped = codec.encode(w, n)
        assert clipped == 0
        columns.append([enc.encrypt(p) for p in plain])
        weights.append([enc.encrypt(n)])
    public = private.public_key
    total = [private.raw_decrypt(c) for c in add_ciphertexts(public, columns)]
    total_rows = private.raw_decrypt(add_ciphertexts(public, weights)[0])
    assert total_rows == sum(rows)
    fedavg = sum(n * w for w, n in zip(models, rows)) / sum(rows)
    got = codec.decode(total, total_rows, 4)
    assert np.max(np.abs(got - fedavg)) <= codec.bound(total_rows, 4)
    assert codec.bound(total_rows, 4) < 1e-5


def _sealed_aggregate(private, slices: int, count: int = 7):  # type: ignore[no-untyped-def]
    """``count`` ciphertexts decrypted in ``slices`` slices as sites do, assembled as the coordinator does."""
    from flwr.app import Array

    from aggregation.paillier.server import ct_width
    from aggregation.paillier.split import bounds, decrypt_slice, sealed_record, slice_key

    enc = Encryptor(private)
    width, n = ct_width(private.public_key), private.public_key.n
    plain = [(7919 * (i + 1)) ** 5 % n for i in range(count)]
    cts = b"".join(enc.encrypt(m).to_bytes(width, "big") for m in plain)
    cuts = bounds(count, slices)
    key = slice_key(private.p, private.q)
    parts = [cts[cuts[k] * width: cuts[k + 1] * width] for k in range(slices)]
    blobs = [decrypt_slice(part, cuts[k], count, width, lambda c: [enc.decrypt(x) for x in c], key,
                           private.public_key)
             for k, part in enumerate(parts)]
    record = sealed_record(blobs, cuts, parts, Array(np.array([1], dtype=np.int64)))
    return plain, record, blobs, parts


def test_split_decryption_slices_open_to_the_plaintexts_and_only_for_the_key_pair(keypair: tuple[Path, Path],
                                                                                tmp_path: Path) -> None:
    from flwr.app import Array

    from aggregation.paillier.split import bounds, open_slices, slice_key

    assert bounds(7, 3) == [0, 2, 4, 7] and bounds(3, 3) == [0, 1, 2, 3]
    private = keys.load_private(keypair[0])
    n = private.public_key.n
    plain, record, blobs, _ = _sealed_aggregate(private, 3)
    assert open_slices(record, slice_key(private.p, private.q), n) == plain
    # another key pair cannot open them
    other = keys.load_private(keys.generate(tmp_path / "other")[0])
    with pytest.raises(ValueError, match="slice 0 .* does not open"):
        open_slices(record, slice_key(other.p, other.q), n)
    # slices swapped between positions (the coordinator reordering them) do not open
    swapped = dict(record.items())
    swapped["sealed"] = Array(np.frombuffer(blobs[1] + blobs[0] + blobs[2], dtype=np.uint8))
    from flwr.app import ArrayRecord

    with pytest.raises(ValueError, match="does not open"):
        open_slices(ArrayRecord(swapped), slice_key(private.p, private.q), n)
    # one flipped byte in a sealed slice
    bad = bytearray(b"".join(blobs))
    bad[len(blobs[0]) + 20] ^= 1
    flipped = dict(record.items())
    flipped["sealed"] = Array(np.frombuffer(bytes(bad), dtype=np.uint8))
    with pytest.raises(ValueError, match="slice 1 .* does not open"):
        open_slices(ArrayRecord(flipped), slice_key(private.p, private.q), n)


def test_a_sealed_slice_opens_only_in_its_own_run_and_round(keypair: tuple[Path, Path]) -> None:
    """Issue #33 (attack 10): the slices' associated data are the sites' own (their run), and the
    round they were decrypted for; an old sealed aggregate does not open later, nor in another run."""
    from flwr.app import Array, ArrayRecord

    from aggregation.paillier.crypto import Encryptor
    from aggregation.paillier.server import ct_width
    from aggregation.paillier.split import decrypt_slice, open_slices, sealed_record, slice_key

    private = keys.load_private(keypair[0])
    enc, width, n, key = Encryptor(private), ct_width(private.public_key), private.public_key.n, \
        slice_key(private.p, private.q)
    ct = enc.encrypt(12345).to_bytes(width, "big")
    blob = decrypt_slice(ct, 0, 1, width, lambda c: [enc.decrypt(x) for x in c], key, private.public_key, 7, 3)
    record = sealed_record([blob], [0, 1], [ct], Array(np.array([1], dtype=np.int64)), 3)
    assert open_slices(record, key, n, run=7, min_round=3) == [12345]
    big_run = 2**64 - 5  # Flower's run ids are unsigned 64-bit
    blob2 = decrypt_slice(ct, 0, 1, width, lambda c: [enc.decrypt(x) for x in c], key, private.public_key, big_run, 3)
    assert open_slices(sealed_record([blob2], [0, 1], [ct], Array(np.array([1], dtype=np.int64)), 3), key, n,
                       run=big_run, min_round=3) == [12345]
    with pytest.raises(ValueError, match="does not open"):  # another run: the site's own run id differs
        open_slices(record, key, n, run=8, min_round=3)
    with pytest.raises(ValueError, match="none older than round 5"):  # round 3's aggregate offered in round 6
        open_slices(record, key, n, run=7, min_round=5)
    relabelled = dict(record.items())
    relabelled["round"] = Array(np.array([5], dtype=np.int64))  # the coordinator relabels the old slices
    with pytest.raises(ValueError, match="does not open"):
        open_slices(ArrayRecord(relabelled), key, n, run=7, min_round=5)


def test_a_malformed_decryption_request_is_refused_with_the_reason(keypair: tuple[Path, Path]) -> None:
    from aggregation.paillier.server import ct_width
    from aggregation.paillier.split import decrypt_slice, sealed_size, slice_key

    private = keys.load_private(keypair[0])
    enc = Encryptor(private)
    width, n = ct_width(private.public_key), private.public_key.n
    key = slice_key(private.p, private.q)
    dec = lambda c: [enc.decrypt(x) for x in c]  # noqa: E731
    good = enc.encrypt(5).to_bytes(width, "big")
    public = private.public_key
    assert len(decrypt_slice(good, 0, 1, width, dec, key, public)) == sealed_size(1, n)
    with pytest.raises(ValueError, match="multiple"):
        decrypt_slice(good[:-1], 0, 1, width, dec, key, public)
    with pytest.raises(ValueError, match="outside"):
        decrypt_slice(good, 1, 1, width, dec, key, public)
    with pytest.raises(ValueError, match=r"not an integer in \(0, n\^2\)"):
        decrypt_slice(bytes(width), 0, 1, width, dec, key, public)
    with pytest.raises(ValueError, match="not a unit"):  # a multiple of p: not a ciphertext under this key
        decrypt_slice(private.p.to_bytes(width, "big"), 0, 1, width, dec, key, public)
