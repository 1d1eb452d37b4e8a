"""Encrypted inner products for vertical learning: many rows per Paillier ciphertext.

Hetero logistic regression needs ``X^T d`` where a party holds ``X`` (rows x features) in the
clear and ``d`` (one value per row) arrives encrypted under *another* party's key. Encrypting one
row per ciphertext costs one Paillier encryption per row and epoch, the dominant cost. Here the
owner of ``d`` packs ``m`` rows into one plaintext, a polynomial in ``2^w``:
``D = sum_j d_j 2^(j w)``, and the holder of ``X`` raises the ciphertext to
``S_k = sum_j x_jk 2^((m-1-j) w)``. The product ``D * S_k`` is the polynomial product, whose
coefficient ``m-1`` is exactly ``sum_j d_j x_jk`` (Kronecker substitution): one ciphertext per ``m``
rows, and the multiplications of all ciphertexts of a batch share one multi-exponentiation per
feature (Pippenger's bucket method). Coefficients are signed integers bounded by
``2^(w-1)``, read back as balanced base-``2^w`` digits, so the result is the exact integer inner
product of the fixed-point values.

Before the key owner decrypts, the holder of ``X`` adds a random mask of ``mask_bits`` more bits
than the whole polynomial, in a fresh encryption (so the ciphertext's randomness is fresh too):
the key owner sees a value statistically hiding every coefficient (distance ``2^-mask_bits``), and
only the holder, who knows the mask, recovers its coefficient ``m-1``.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass

import gmpy2
import numpy as np
from phe import paillier

from aggregation.paillier.crypto import chunks, many_obfuscators, parallel_map


@dataclass(frozen=True)
class RowCodec:
    """Fixed point and packing of one batch's rows (every party uses the same parameters).

    ``x_bits``: fraction bits of the features (clipped to ``±x_clip``); ``d_bits``: fraction bits of
    the per-row values (clipped to ``±d_clip``); ``max_rows``: most rows in one batch.
    """

    key_bits: int = 2048
    x_bits: int = 8
    x_clip: float = 8.0
    d_bits: int = 14
    d_clip: float = 4.0
    max_rows: int = 32768
    mask_bits: int = 40

    @property
    def slot_bits(self) -> int:
        """``w``: room for a sum of ``max_rows`` products and a sign."""
        xb = math.ceil(math.log2(self.x_clip)) + self.x_bits
        db = math.ceil(math.log2(self.d_clip)) + self.d_bits
        return xb + db + math.ceil(math.log2(self.max_rows)) + 1

    @property
    def rows_per_ciphertext(self) -> int:
        """``m``: the polynomial product (``2m - 1`` coefficients) plus the mask fit below ``n/2``."""
        usable = self.key_bits - 2 - self.mask_bits
        m = (usable // self.slot_bits + 1) // 2
        if m < 1:
            raise ValueError(f"a {self.slot_bits}-bit slot does not fit a {self.key_bits}-bit key")
        return m

    def ciphertexts(self, rows: int) -> int:
        """Ciphertexts ``rows`` values take, packed."""
        return -(-rows // self.rows_per_ciphertext)

    def quantise_x(self, x: np.ndarray) -> np.ndarray:
        """Features ``x`` clipped and quantised to ``x_bits`` fraction bits."""
        return np.rint(np.clip(x, -self.x_clip, self.x_clip) * (1 << self.x_bits)).astype(np.int64)

    def quantise_d(self, d: np.ndarray) -> np.ndarray:
        """Residuals ``d`` clipped and quantised to ``d_bits`` fraction bits."""
        return np.rint(np.clip(d, -self.d_clip, self.d_clip) * (1 << self.d_bits)).astype(np.int64)

    @property
    def scale(self) -> float:
        """Divide a decoded inner product by this to get ``sum_j d_j x_j`` in real units."""
        return float(1 << (self.x_bits + self.d_bits))

    # ---- packing ---------------------------------------------------------------------------
    def pack_rows(self, d: np.ndarray) -> list[int]:
        """``D_t = sum_j d_j 2^(j w)`` per group of ``m`` rows (signed Python ints)."""
        m, w = self.rows_per_ciphertext, self.slot_bits
        out = []
        for s in range(0, len(d), m):
            acc = 0
            for v in reversed(d[s:s + m].tolist()):
                acc = (acc << w) + v
            out.append(acc)
        return out

    def exponents(self, x: np.ndarray) -> list[list[int]]:
        """``S_tk = sum_j x_jk 2^((m-1-j) w)`` per group ``t`` and feature ``k`` (signed)."""
        m, w = self.rows_per_ciphertext, self.slot_bits
        out = []
        for s in range(0, x.shape[0], m):
            block = x[s:s + m]
            per = []
            for k in range(x.shape[1]):
                acc = 0
                for v in block[:, k].tolist():
                    acc = (acc << w) + v
                acc <<= w * (m - block.shape[0])  # a short last group: its rows still sit at 0..len-1
                per.append(acc)
            out.append(per)
        return out

    def coefficient(self, value: int) -> int:
        """Coefficient ``m-1`` of a signed polynomial value (balanced base-``2^w`` digits)."""
        w = self.slot_bits
        base, half = 1 << w, 1 << (w - 1)
        for _ in range(self.rows_per_ciphertext - 1):
            digit = value & (base - 1)
            if digit >= half:
                digit -= base
            value = (value - digit) >> w
        digit = value & (base - 1)
        return digit - base if digit >= half else digit


def signed(value: int, n: int) -> int:
    """A plaintext mod ``n`` as a signed integer in ``(-n/2, n/2]``."""
    value %= n
    return value - n if value > n // 2 else value


def encrypt_packed(private: paillier.PaillierPrivateKey, values: list[int], workers: int = 1,
                   obfuscators: str = "full") -> list[int]:
    """Ciphertexts of signed packed plaintexts under the owner's key (CRT obfuscators, or DJN's with
    ``obfuscators="djn"``, over ``workers`` processes, 0: all cores)."""
    workers = workers or os.cpu_count() or 1
    n = int(private.public_key.n)
    n2 = gmpy2.mpz(n * n)
    obf = many_obfuscators(private, len(values), workers, obfuscators)
    return [int(((1 + (v % n) * n) * o) % n2) for v, o in zip(values, obf)]


def add_plain(public: paillier.PaillierPublicKey, cts: list[int], values: list[int]) -> list[int]:
    """``Enc(a) -> Enc(a + b)`` for signed packed plaintexts ``b`` (no new randomness needed)."""
    n = int(public.n)
    n2 = gmpy2.mpz(public.nsquare)
    if len(cts) != len(values):
        raise ValueError(f"{len(cts)} ciphertexts for {len(values)} packed plaintexts")
    return [int((gmpy2.mpz(c) * (1 + (v % n) * n)) % n2) for c, v in zip(cts, values)]


def _multiexp(bases: list, inverses: list, exps: list[int], n2):
    """``prod_t base_t^e_t mod n2`` for signed ``e_t`` (Pippenger's buckets; 4- or 8-bit digits,
    whichever costs fewer multiplications for this many bases)."""
    signs = [e < 0 for e in exps]
    mags = [-e if e < 0 else e for e in exps]
    top = max((e.bit_length() for e in mags), default=0)
    if top == 0:
        return gmpy2.mpz(1)
    nbytes = -(-top // 8)
    raw = np.frombuffer(b"".join(e.to_bytes(nbytes, "little") for e in mags), dtype=np.uint8).reshape(len(mags), nbytes)
    window = 8 if (top / 8) * (len(mags) + 512) < (top / 4) * (len(mags) + 32) else 4
    if window == 4:  # little-endian nibbles: low nibble of byte i is digit 2i
        digits = np.empty((len(mags), 2 * nbytes), dtype=np.uint8)
        digits[:, 0::2], digits[:, 1::2] = raw & 15, raw >> 4
    else:
        digits = raw
    use = [inverses[t] if signs[t] else bases[t] for t in range(len(mags))]
    one = gmpy2.mpz(1)
    result = one
    for col in range(digits.shape[1] - 1, -1, -1):
        if result is not one:
            for _ in range(window):
                result = result * result % n2
        buckets = [one] * (1 << window)
        column = digits[:, col]
        for t in np.flatnonzero(column).tolist():
            d = column[t]
            buckets[d] = buckets[d] * use[t] % n2
        running, acc = one, one
        for d in range((1 << window) - 1, 0, -1):
            if buckets[d] is not one:
                running = running * buckets[d] % n2
            if running is not one:
                acc = acc * running % n2
        if acc is not one:
            result = result * acc % n2
    return result


def products_job(n2: int, cts: list[int], columns: list[list[int]]) -> list[int]:
    """Worker job: the multi-exponentiation of ``cts`` for each exponent column."""
    m2 = gmpy2.mpz(n2)
    bases = [gmpy2.mpz(c) for c in cts]
    inverses = [gmpy2.invert(b, m2) for b in bases]
    return [int(_multiexp(bases, inverses, col, m2)) for col in columns]


def inner_products(public: paillier.PaillierPublicKey, cts: list[int], exps: list[list[int]],
                   workers: int = 1) -> list[int]:
    """Per feature ``k``: ``Enc(sum_t D_t * S_tk)`` (coefficient ``m-1`` holds ``sum_j d_j x_jk``);
    the features are spread over ``workers`` processes (0: all cores)."""
    if len(cts) != len(exps):
        raise ValueError(f"{len(cts)} ciphertexts for {len(exps)} row groups")
    features = len(exps[0]) if exps else 0
    columns = [[e[k] for e in exps] for k in range(features)]
    n2 = int(public.nsquare)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or features < 2:
        return products_job(n2, cts, columns)
    parts = chunks(columns, workers)
    return [c for part in parallel_map(products_job, [(n2, cts, p) for p in parts], workers) for c in part]


def mask(public: paillier.PaillierPublicKey, cts: list[int], codec: RowCodec) -> tuple[list[int], list[int]]:
    """Add a fresh encryption of a random mask to each ciphertext; returns (masked, masks)."""
    bits = (2 * codec.rows_per_ciphertext - 1) * codec.slot_bits + codec.mask_bits
    n2 = gmpy2.mpz(public.nsquare)
    masks = [secrets.randbits(bits) for _ in cts]
    return [int(gmpy2.mpz(c) * public.raw_encrypt(r) % n2) for c, r in zip(cts, masks)], masks


def decrypt(private: paillier.PaillierPrivateKey, cts: list[int]) -> list[int]:
    """The plaintexts of ``cts``."""
    return [int(private.raw_decrypt(c)) for c in cts]


def unmask(values: list[int], masks: list[int], n: int, codec: RowCodec) -> np.ndarray:
    """The inner products (real units) from the key owner's decryptions of masked ciphertexts."""
    return np.array([codec.coefficient(signed(v - r, n)) for v, r in zip(values, masks)], dtype=np.float64) \
        / codec.scale


def to_bytes(cts: list[int], n: int) -> bytes:
    """The ciphertexts ``cts`` under modulus ``n`` as fixed-width bytes."""
    width = (2 * n.bit_length() + 7) // 8
    return b"".join(c.to_bytes(width, "big") for c in cts)


def from_bytes(blob: bytes, n: int, what: str) -> list[int]:
    """Ciphertexts (or plaintexts below ``n^2``) from fixed-width bytes; a clear error if malformed."""
    width = (2 * n.bit_length() + 7) // 8
    if len(blob) % width:
        raise ValueError(f"{what}: {len(blob)} bytes is not a whole number of {width}-byte ciphertexts")
    n2 = n * n
    out = [int.from_bytes(blob[k:k + width], "big") for k in range(0, len(blob), width)]
    if any(not 0 < c < n2 for c in out):
        raise ValueError(f"{what}: a value is outside (0, n^2): wrong key or corrupt")
    return out
