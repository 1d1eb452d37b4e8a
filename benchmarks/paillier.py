"""Issue #5: packed, CRT-accelerated Paillier vs naive per-element ``phe`` (and CKKS via TenSEAL).

For models of 10k, 100k and 1M parameters and 10 sites, 2048-bit keys, one round:

* **site**: quantise + pack + encrypt its update, and decrypt + unpack the aggregate
  (``decryption=each``: the whole aggregate; ``split``: its slice of one in 10, sealed, then
  opening the 10 sealed slices with AES-GCM; both in the same repetition, checked to give the
  same aggregate);
* **server**: add the 10 sites' ciphertext vectors;
* **bytes** each site sends (ciphertexts) and per parameter, against float32.

``naive`` is ``phe`` as its documentation uses it (``public_key.encrypt(float)`` per value,
``EncryptedNumber`` additions, ``private_key.decrypt``), timed on a sample of values and
scaled. ``ours`` is ``aggregation/paillier``: 16-bit values, 102 per ciphertext, CRT
encryption with the private key, spread over the cores, with ``full`` obfuscators (Paillier's
own, the default) and with ``djn`` ones (``aggregation.obfuscators=djn``: an extra assumption,
docs/paillier.md). Each repetition (``--reps``, default 3) times all three in turn; speedups are
medians over repetitions with their range. ``bound`` is the work no implementation can skip
(one obfuscator at its method's minimum and one CRT decryption per ciphertext, timed alone). CPU time counts every process and
the obfuscators' precomputation; "critical path" is what remains in the round when the
obfuscators are computed ahead (between rounds). At 10k all 10 sites encrypt distinct
updates and the aggregate is checked against the plaintext sum (``max_abs_error``); at 100k
and 1M one site's work is timed and its ciphertexts stand for the others' at the server
(whose cost does not depend on the values). With ``tenseal`` installed, CKKS (what NVIDIA
FLARE uses) is timed in the same run.

    python benchmarks/paillier.py            # about 5 minutes on 2 cores
    python benchmarks/paillier.py --sizes 10000 100000

The last line printed is one JSON object (also in ``benchmarks/results/paillier.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import Array

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from phe import paillier  # noqa: E402

from aggregation.paillier.crypto import (  # noqa: E402
    Encryptor,
    add_ciphertexts,
    chunks,
    decrypt_job,
    obfuscators_job,
    parallel_map,
)
from aggregation.paillier.packing import Packer  # noqa: E402
from aggregation.paillier.split import bounds, decrypt_slice, open_slices, seal_plaintexts, sealed_record, slice_key  # noqa: E402

SITES = 10
KEY_BITS = 2048
CT_BYTES = 2 * KEY_BITS // 8  # a ciphertext lives in Z_(n^2)
CLIP = 0.5


def cpu() -> float:
    """CPU seconds of this process (worker processes report their own)."""
    return time.process_time()


def _timed(job: str, p: int, q: int, n: int, arg: object, kind: str = "full") -> tuple[list[int], float]:
    """Run a :mod:`aggregation.paillier.crypto` worker job; return its result and CPU seconds."""
    t0 = time.process_time()
    if job == "obf":
        out = obfuscators_job(p, q, n, arg, kind)  # type: ignore[arg-type]
    else:
        out = decrypt_job(p, q, n, arg)  # type: ignore[arg-type]
    return out, time.process_time() - t0


def gather(parts: list[tuple[list[int], float]]) -> tuple[list[int], float]:
    """Concatenated results and the CPU seconds the workers spent."""
    return [x for part, _ in parts for x in part], sum(c for _, c in parts)


def ours(private: paillier.PaillierPrivateKey, size: int, workers: int, check: bool, kind: str = "full") -> dict[str, float]:
    public = private.public_key
    packer = Packer(CLIP, 16, 16, KEY_BITS - 1)
    enc = Encryptor(private, kind)
    key = (private.p, private.q, public.n)
    rng = np.random.default_rng(size)
    updates = [rng.uniform(-CLIP, CLIP, size) for _ in range(SITES if check else 1)]
    count = packer.count(size)
    # obfuscators: computed ahead of the round, over the cores (CPU counted, off the critical path)
    c0, w0 = cpu(), time.perf_counter()
    obf, worker_cpu = gather(parallel_map(_timed, [("obf", *key, len(c), kind) for c in chunks(list(range(count)), workers)],
                                          workers))
    obf_wall, obf_cpu = time.perf_counter() - w0, cpu() - c0 + worker_cpu
    # the round: pack + encrypt with the precomputed obfuscators
    c0, w0 = cpu(), time.perf_counter()
    columns = []
    for u in updates:
        plain = packer.pack(packer.quantise(u)[0])
        columns.append([enc.encrypt(m, o) for m, o in zip(plain, obf)])
    enc_wall = (time.perf_counter() - w0) / len(updates)
    enc_cpu = (cpu() - c0) / len(updates)
    while len(columns) < SITES:
        columns.append(columns[len(columns) % len(updates)])
    c0, w0 = cpu(), time.perf_counter()
    total = add_ciphertexts(public, columns)
    srv_wall, srv_cpu = time.perf_counter() - w0, cpu() - c0
    c0, w0 = cpu(), time.perf_counter()
    sums, worker_cpu = gather(parallel_map(_timed, [("dec", *key, c) for c in chunks(total, workers)], workers))
    mean = packer.decode_sum(packer.unpack(sums, size), SITES) / SITES
    dec_wall, dec_cpu = time.perf_counter() - w0, cpu() - c0 + worker_cpu
    err = float(np.max(np.abs(mean - np.mean(updates, axis=0)))) if check else float("nan")
    # decryption=split: this site decrypts and seals its slice (one of SITES), then opens all SITES
    # slices and decodes. The other sites' sealed slices are made from the plaintexts above (their work).
    width, skey = CT_BYTES, slice_key(private.p, private.q)
    whole = b"".join(c.to_bytes(width, "big") for c in total)
    cuts = bounds(len(total), SITES)
    parts = [whole[cuts[k] * width: cuts[k + 1] * width] for k in range(SITES)]
    c0, w0 = cpu(), time.perf_counter()
    mine = decrypt_slice(parts[0], 0, len(total), width, enc_decrypt(enc), skey, public)
    own_wall, own_cpu = time.perf_counter() - w0, cpu() - c0
    blobs = [mine] + [seal_plaintexts(sums[cuts[k]: cuts[k + 1]], cuts[k], len(total), parts[k], skey, public.n)
                      for k in range(1, SITES)]
    record = sealed_record(blobs, cuts, parts, Array(np.array([SITES], dtype=np.int64)))
    c0, w0 = cpu(), time.perf_counter()
    opened = open_slices(record, skey, public.n)
    mean_split = packer.decode_sum(packer.unpack(opened, size), SITES) / SITES
    open_wall, open_cpu = time.perf_counter() - w0, cpu() - c0
    assert opened == sums and np.array_equal(mean_split, mean), "split decryption must give the same aggregate"
    split_cpu = own_cpu + open_cpu
    return {"ciphertexts": count, "obfuscators_cpu": obf_cpu, "obfuscators_wall": obf_wall,
            "encrypt_cpu": enc_cpu, "encrypt_wall": enc_wall, "server_cpu": srv_cpu, "server_wall": srv_wall,
            "decrypt_cpu": dec_cpu, "decrypt_wall": dec_wall,
            "round_cpu": obf_cpu + enc_cpu + srv_cpu + dec_cpu,
            "critical_path_wall": enc_wall + srv_wall + dec_wall,
            "decrypt_split_cpu": split_cpu, "decrypt_split_own_cpu": own_cpu, "decrypt_split_open_cpu": open_cpu,
            "round_cpu_split": obf_cpu + enc_cpu + srv_cpu + split_cpu,
            "critical_path_wall_split": enc_wall + srv_wall + own_wall + open_wall,
            "bytes_up": count * CT_BYTES, "max_abs_error": err, "bound": packer.delta / 2}


def enc_decrypt(enc: Encryptor):  # type: ignore[no-untyped-def]
    return lambda cts: [enc.decrypt(c) for c in cts]


def bound(private: paillier.PaillierPrivateKey, count: int, kind: str, reps: int = 20) -> dict[str, float]:
    """CPU seconds of the work no implementation of this round can skip, for ``count`` ciphertexts:
    one obfuscator each at its method's minimum (``full``: two half-size exponentiations
    ``a^p mod p^2``, ``b^q mod q^2``; ``djn``: its 2 x 128 fixed-base multiplications) and one
    CRT decryption each (``c^(p-1) mod p^2``, ``c^(q-1) mod q^2``), timed alone, minimum of ``reps``."""
    import gmpy2

    p, q = gmpy2.mpz(private.p), gmpy2.mpz(private.q)
    p2, q2 = p * p, q * q
    c = gmpy2.mpz(Encryptor(private).encrypt(12345))
    enc = Encryptor(private, kind)
    if kind == "djn":
        tp, tq = enc._tables()  # noqa: SLF001  # the tables are built once per process: not per ciphertext
        a = (1 << enc.djn_bits) - 1 - (1 << (enc.djn_bits // 2))  # every window non-zero but one: the worst case
        obf = lambda: (tp.pow(a), tq.pow(a))  # noqa: E731
    else:
        obf = lambda: (gmpy2.powmod(p - 2, p, p2), gmpy2.powmod(q - 2, q, q2))  # noqa: E731
    dec = lambda: (gmpy2.powmod(c, p - 1, p2), gmpy2.powmod(c, q - 1, q2))  # noqa: E731
    best = {}
    for name, fn in (("obfuscator", obf), ("decrypt", dec)):
        times = []
        for _ in range(reps):
            t0 = time.process_time()
            for _ in range(5):
                fn()
            times.append((time.process_time() - t0) / 5)
        best[name] = min(times)
    return {"obfuscator_s": best["obfuscator"], "decrypt_s": best["decrypt"],
            "round_cpu": count * (best["obfuscator"] + best["decrypt"]),
            # decryption=split: a site decrypts one slice of SITES (opening the sealed rest is AES, not counted)
            "round_cpu_split": count * best["obfuscator"] + -(-count // SITES) * best["decrypt"]}


def naive(private: paillier.PaillierPrivateKey, size: int, sample: int = 200) -> dict[str, float]:
    """Per-element phe, timed on ``sample`` values and scaled to ``size``."""
    public = private.public_key
    x = np.random.default_rng(0).uniform(-CLIP, CLIP, sample)
    t0 = time.perf_counter()
    enc = [public.encrypt(float(v)) for v in x]
    t_enc = (time.perf_counter() - t0) / sample
    t0 = time.perf_counter()
    acc = enc[: sample // 10]
    for _ in range(SITES - 1):
        acc = [a + b for a, b in zip(acc, enc[: sample // 10])]
    t_add = (time.perf_counter() - t0) / (sample // 10)
    t0 = time.perf_counter()
    for c in enc[: sample // 4]:
        private.decrypt(c)
    t_dec = (time.perf_counter() - t0) / (sample // 4)
    return {"encrypt_cpu": t_enc * size, "server_cpu": t_add * size, "decrypt_cpu": t_dec * size,
            "round_cpu": (t_enc + t_add + t_dec) * size, "bytes_up": size * CT_BYTES}


def ckks(size: int) -> dict[str, float] | None:
    """CKKS via TenSEAL (NVIDIA FLARE's HE), if installed: encrypt, add 10, decrypt, bytes."""
    try:
        import tenseal as ts
    except ImportError:
        return None
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2**40
    ctx.generate_galois_keys()
    x = np.random.default_rng(0).uniform(-CLIP, CLIP, size)
    t0 = time.perf_counter()
    v = ts.ckks_vector(ctx, x.tolist())
    t_enc = time.perf_counter() - t0
    blob = v.serialize()
    t0 = time.perf_counter()
    acc = v
    for _ in range(SITES - 1):
        acc = acc + v
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = np.array(acc.decrypt())
    t_dec = time.perf_counter() - t0
    return {"encrypt_wall": t_enc, "server_wall": t_add, "decrypt_wall": t_dec, "bytes_up": len(blob),
            "max_abs_error": float(np.max(np.abs(out / SITES - x)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (medians and ranges)")
    args = parser.parse_args()
    _, private = paillier.generate_paillier_keypair(n_length=KEY_BITS)
    rows = []
    for size in args.sizes:
        reps: list[dict] = []
        for _ in range(args.reps):  # interleaved: ours (both kinds) and naive phe in each repetition
            o = ours(private, size, args.workers, check=size <= 10_000)
            d = ours(private, size, args.workers, check=size <= 10_000, kind="djn")
            nv = naive(private, size)
            reps.append({"ours": o, "ours_djn": d, "naive": nv})
        med = lambda f, reps=reps: statistics.median(f(r) for r in reps)  # noqa: E731
        rng = lambda f, reps=reps: [min(f(r) for r in reps), max(f(r) for r in reps)]  # noqa: E731
        o, d = reps[0]["ours"], reps[0]["ours_djn"]
        count = o["ciphertexts"]
        row = {"parameters": size, "reps": reps, "ours": o, "ours_djn": d, "naive": reps[0]["naive"], "ckks": ckks(size),
               "bound": bound(private, count, "full"), "bound_djn": bound(private, count, "djn")}
        combos = (("", "ours", ""), ("_split", "ours", "_split"), ("_djn", "ours_djn", ""),
                  ("_djn_split", "ours_djn", "_split"))
        for tag, key, dec in combos:
            field, path = f"round_cpu{dec}", f"critical_path_wall{dec}"
            row[f"round_cpu{tag}"] = med(lambda r, key=key, field=field: r[key][field])
            row[f"speedup_cpu{tag}"] = med(lambda r, key=key, field=field: r["naive"]["round_cpu"] / r[key][field])
            row[f"speedup_cpu{tag}_range"] = rng(lambda r, key=key, field=field: r["naive"]["round_cpu"] / r[key][field])
            row[f"speedup_critical_path{tag}"] = med(lambda r, key=key, path=path: r["naive"]["round_cpu"] / r[key][path])
            bound_row = row["bound_djn" if "djn" in key else "bound"]
            row[f"ratio_to_bound{tag}"] = row[f"round_cpu{tag}"] / bound_row[f"round_cpu{dec}"]
        row["naive_round_cpu"] = med(lambda r: r["naive"]["round_cpu"])
        row["naive_round_cpu_range"] = rng(lambda r: r["naive"]["round_cpu"])
        row["bytes_per_parameter"], row["x_float32"] = o["bytes_up"] / size, o["bytes_up"] / (4 * size)
        rows.append(row)
        ck = row["ckks"]
        print(f"{size:>9,} params | naive phe {row['naive_round_cpu']:.0f} s CPU "
              f"[{row['naive_round_cpu_range'][0]:.0f}-{row['naive_round_cpu_range'][1]:.0f}] | "
              f"full: {row['round_cpu']:.2f} s CPU (obfuscators {o['obfuscators_cpu']:.2f}, decrypt {o['decrypt_cpu']:.2f}), "
              f"{row['speedup_cpu']:.0f}x [{row['speedup_cpu_range'][0]:.0f}-{row['speedup_cpu_range'][1]:.0f}], "
              f"{row['ratio_to_bound']:.2f}x its bound | full+split: {row['round_cpu_split']:.2f} s CPU "
              f"(decrypt {o['decrypt_split_cpu']:.2f}), {row['speedup_cpu_split']:.0f}x "
              f"[{row['speedup_cpu_split_range'][0]:.0f}-{row['speedup_cpu_split_range'][1]:.0f}], "
              f"{row['ratio_to_bound_split']:.2f}x its bound | djn: {row['round_cpu_djn']:.2f} s CPU, "
              f"{row['speedup_cpu_djn']:.0f}x "
              f"[{row['speedup_cpu_djn_range'][0]:.0f}-{row['speedup_cpu_djn_range'][1]:.0f}], "
              f"{row['ratio_to_bound_djn']:.2f}x its bound | djn+split: {row['round_cpu_djn_split']:.2f} s CPU, "
              f"{row['speedup_cpu_djn_split']:.0f}x [{row['speedup_cpu_djn_split_range'][0]:.0f}-"
              f"{row['speedup_cpu_djn_split_range'][1]:.0f}], "
              f"{row['ratio_to_bound_djn']:.2f}x its bound | {o['bytes_up'] / 1e6:.2f} MB up "
              f"({row['bytes_per_parameter']:.2f} B/param, {row['x_float32']:.2f}x float32)"
              + (f" | CKKS {ck['encrypt_wall'] + ck['decrypt_wall']:.2f} s, {ck['bytes_up'] / 1e6:.2f} MB" if ck else
                 " | CKKS: tenseal not installed"), flush=True)
    ref = next((r for r in rows if r["parameters"] == 100_000), rows[-1])
    errors = [r["ours"]["max_abs_error"] for r in rows if r["ours"]["max_abs_error"] == r["ours"]["max_abs_error"]]
    errors += [r["ours_djn"]["max_abs_error"] for r in rows if r["ours_djn"]["max_abs_error"] == r["ours_djn"]["max_abs_error"]]
    summary = {"speedup_vs_naive": round(ref["speedup_cpu"], 1), "speedup_vs_naive_range": ref["speedup_cpu_range"],
               "speedup_vs_naive_djn": round(ref["speedup_cpu_djn"], 1),
               "speedup_vs_naive_djn_range": ref["speedup_cpu_djn_range"],
               "speedup_vs_naive_split": round(ref["speedup_cpu_split"], 1),
               "speedup_vs_naive_split_range": ref["speedup_cpu_split_range"],
               "speedup_vs_naive_djn_split": round(ref["speedup_cpu_djn_split"], 1),
               "speedup_vs_naive_djn_split_range": ref["speedup_cpu_djn_split_range"],
               "ratio_to_bound_split": round(ref["ratio_to_bound_split"], 2),
               "ratio_to_bound_djn_split": round(ref["ratio_to_bound_djn_split"], 2),
               "speedup_vs_naive_critical_path": round(ref["speedup_critical_path"], 1),
               "ratio_to_bound": round(ref["ratio_to_bound"], 2), "ratio_to_bound_djn": round(ref["ratio_to_bound_djn"], 2),
               "at_parameters": ref["parameters"], "key_bits": KEY_BITS, "sites": SITES, "repetitions": args.reps,
               "max_abs_error": max(errors) if errors else None,
               "error_bound": rows[0]["ours"]["bound"], "bytes_per_parameter": round(ref["bytes_per_parameter"], 3)}
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "paillier.json").write_text(json.dumps({"command": " ".join(["python benchmarks/paillier.py", *sys.argv[1:]]),
                                                   "rows": rows, "summary": summary}, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
