"""Fast Paillier encryption for key holders, and ciphertext checks for the server.

Sites hold the private key, so they can compute the expensive part of an encryption, the
obfuscator ``r^n mod n^2`` (over 99 % of the time), by the Chinese remainder theorem:
``r^(n mod p(p-1)) mod p^2`` and the same mod ``q^2``, recombined. Half-size moduli make
this about 3-4x faster; the result is bit-for-bit what ``phe``'s ``raw_encrypt`` returns
for the same ``r`` (tested). Obfuscators do not depend on the message, so a site can also
compute them ahead of the round (:meth:`Encryptor.obfuscators`), leaving two
multiplications per ciphertext on the critical path. Decryption is ``phe``'s own, which
already uses CRT. Work is spread over processes with :func:`parallel_map`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, TypeVar

import gmpy2
from phe import paillier

T = TypeVar("T")
R = TypeVar("R")


class Encryptor:
    """Paillier encryption with the private key's CRT shortcut (``g = n + 1``)."""

    def __init__(self, private: paillier.PaillierPrivateKey) -> None:
        p, q = gmpy2.mpz(private.p), gmpy2.mpz(private.q)
        self.n = gmpy2.mpz(private.public_key.n)
        self.nsquare = self.n * self.n
        self.p2, self.q2 = p * p, q * q
        self.ep, self.eq = self.n % (p * (p - 1)), self.n % (q * (q - 1))
        self.p2_inv = gmpy2.invert(self.p2, self.q2)

    def obfuscator(self, r: int | None = None) -> int:
        """``r^n mod n^2`` for a fresh random ``r`` in Z_n^* (or the given one)."""
        r = gmpy2.mpz(r if r is not None else secrets.randbelow(int(self.n) - 1) + 1)
        xp = gmpy2.powmod(r % self.p2, self.ep, self.p2)
        xq = gmpy2.powmod(r % self.q2, self.eq, self.q2)
        return int(xp + self.p2 * (((xq - xp) * self.p2_inv) % self.q2))

    def obfuscators(self, count: int) -> list[int]:
        return [self.obfuscator() for _ in range(count)]

    def encrypt(self, plaintext: int, obfuscator: int | None = None) -> int:
        """The ciphertext of ``0 <= plaintext < n``."""
        if not 0 <= plaintext < self.n:
            raise ValueError("plaintext must be in [0, n)")
        obf = self.obfuscator() if obfuscator is None else obfuscator
        return int(((self.n * plaintext + 1) * obf) % self.nsquare)


def add_ciphertexts(public: paillier.PaillierPublicKey, columns: Sequence[Sequence[int]]) -> list[int]:
    """Element-wise homomorphic sum of several sites' ciphertext vectors (the server's work)."""
    n2 = gmpy2.mpz(public.nsquare)
    out = [gmpy2.mpz(c) for c in columns[0]]
    for col in columns[1:]:
        for i, c in enumerate(col):
            out[i] = (out[i] * c) % n2
    return [int(c) for c in out]


def check_ciphertexts(public: paillier.PaillierPublicKey, cts: Sequence[Any], expected: int) -> str | None:
    """Why a site's ciphertext vector must be rejected, or None.

    Catches malformed vectors (count, type, range) and, cheaply, most ciphertexts under a
    different key: a valid ciphertext is a unit of Z_(n^2), i.e. coprime to ``n``.
    """
    if len(cts) != expected:
        return f"{len(cts)} ciphertexts, expected {expected}"
    n, n2 = gmpy2.mpz(public.n), gmpy2.mpz(public.nsquare)
    for k, c in enumerate(cts):
        if not isinstance(c, int) or not 0 < c < n2:
            return f"ciphertext {k} is not an integer in (0, n^2): wrong key size or corrupt"
        if gmpy2.gcd(c, n) != 1:
            return f"ciphertext {k} is not a unit mod n^2: not a Paillier ciphertext under this key"
    return None


_KEYS: dict[int, tuple[paillier.PaillierPrivateKey, Encryptor]] = {}


def _key(p: int, q: int, n: int) -> tuple[paillier.PaillierPrivateKey, Encryptor]:
    if n not in _KEYS:
        private = paillier.PaillierPrivateKey(paillier.PaillierPublicKey(n), p, q)
        _KEYS[n] = (private, Encryptor(private))
    return _KEYS[n]


def obfuscators_job(p: int, q: int, n: int, count: int) -> list[int]:
    """Worker job: ``count`` fresh obfuscators."""
    return _key(p, q, n)[1].obfuscators(count)


def decrypt_job(p: int, q: int, n: int, cts: list[int]) -> list[int]:
    """Worker job: CRT decryption of ``cts``."""
    private = _key(p, q, n)[0]
    return [private.raw_decrypt(c) for c in cts]


def chunks(items: list[T], parts: int) -> list[list[T]]:
    size = max(1, -(-len(items) // max(1, parts)))
    return [items[i : i + size] for i in range(0, len(items), size)]


def many_obfuscators(private: paillier.PaillierPrivateKey, count: int, workers: int) -> list[int]:
    """``count`` obfuscators over ``workers`` processes (1 = this process)."""
    key = (private.p, private.q, private.public_key.n)
    if workers == 1:
        return _key(*key)[1].obfuscators(count)
    parts = [len(c) for c in chunks(list(range(count)), workers)]
    return [o for part in parallel_map(obfuscators_job, [(*key, k) for k in parts], workers) for o in part]


def decrypt_all(private: paillier.PaillierPrivateKey, cts: list[int], workers: int) -> list[int]:
    """Decrypt ``cts`` over ``workers`` processes (1 = this process)."""
    key = (private.p, private.q, private.public_key.n)
    if workers == 1:
        return [private.raw_decrypt(c) for c in cts]
    return [m for part in parallel_map(decrypt_job, [(*key, c) for c in chunks(cts, workers)], workers) for m in part]


def _call(args: tuple[Callable[..., R], tuple]) -> R:
    fn, a = args
    return fn(*a)


_POOL: ProcessPoolExecutor | None = None


def parallel_map(fn: Callable[..., R], jobs: list[tuple], workers: int | None = None) -> list[R]:
    """``[fn(*job) for job in jobs]`` over ``workers`` processes (0/None: all cores).

    The pool is started once per process with ``spawn`` (safe inside Flower's threaded
    runtimes, about a second to start) and reused.
    """
    global _POOL
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < 2:
        return [fn(*job) for job in jobs]
    if _POOL is None or _POOL._max_workers != workers:  # type: ignore[attr-defined]  # noqa: SLF001
        _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    return list(_POOL.map(_call, [(fn, job) for job in jobs]))
