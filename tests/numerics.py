"""This machine's floating-point numerics, as a fingerprint, and how two runs' numbers are compared.

The same config and seed give the same numbers bit for bit **on the same numerics**: the same torch
and NumPy builds running the same kernels. Across machines the kernels differ (torch's ATen code path
by instruction set, Intel MKL's and oneDNN's own dispatch, OpenBLAS's core type), and a float sum
can differ in its last bits. :func:`fingerprint` names what decides that: the library versions, the
kernel paths torch and NumPy's BLAS report, the instruction sets that change them, and the hash of
a probe that runs the operations fedsilo's training uses (linear layers forward and backward, SGD
with momentum, the losses, seeded normal draws, BLAS products and reductions) on fixed inputs.

:func:`compare` then checks a run against recorded numbers: **bit for bit** where the fingerprints
match, and **within a tolerance** where they do not (integers, strings and structure still exactly;
model hashes replaced by each model's float64 summary, :func:`model_summary`). The tolerance is far
below what any real change does (a changed seed moves metrics by 1e-3 or more, a one-ULP change is
caught on matching numerics) and far above the last-bit drift of another kernel path (measured:
README, Reproducibility).
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
from typing import Any

import numpy as np

#: Relative and absolute tolerance where numerics differ (see the module docstring and
#: tests/integration/test_regression_grid.py for the measured drift it covers).
RTOL, ATOL = 1e-4, 1e-5
#: Keys compared only where the numerics match: digests of bytes cannot be compared within a tolerance
#: (their summaries are, under ``*_summary``).
DIGEST_SUFFIX = "sha256"
#: Environment variables that choose kernel paths; part of the fingerprint when set.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA",
              "DNNL_MAX_CPU_ISA", "OPENBLAS_CORETYPE", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


#: Kernel paths pinned for the tests (set before torch is imported; child processes inherit them):
#: torch's ATen kernels, Intel MKL's dispatch and oneDNN's at AVX2, which every x86-64 machine the
#: suite runs on has. They narrow the differences between machines; the fingerprint covers the rest
#: (OpenBLAS's core type, which the machine may set itself, is recorded, not changed).
PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin() -> None:
    """Set :data:`PINS` where the environment does not choose otherwise (before torch is imported)."""
    for key, value in PINS.items():
        os.environ.setdefault(key, value)


def _cpu() -> dict[str, Any]:
    vendor, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id") and not vendor:
                    vendor = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx", "fma", "sse4", "amx")))
    return {"machine": platform.machine(), "vendor": vendor, "isa": isa}


def _blas() -> list[dict[str, Any]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("internal_api", "version", "architecture", "threading_layer")
    return sorted(({k: i.get(k) for k in keep} for i in threadpool_info() if i.get("user_api") == "blas"),
                  key=lambda d: str(d))


def probe() -> str:
    """SHA-256 of the outputs of the operations fedsilo's runs use, on fixed inputs (single thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        h = hashlib.sha256()
        g = torch.Generator().manual_seed(0)
        for rows, width, hidden in ((64, 23, (64, 32)), (256, 13, (32,)), (7, 30, (8,))):
            layers: list[torch.nn.Module] = []
            fan_in = width
            for size in hidden:
                layers += [torch.nn.Linear(fan_in, size), torch.nn.ReLU()]
                fan_in = size
            layers.append(torch.nn.Linear(fan_in, 1))
            model = torch.nn.Sequential(*layers)
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            x = torch.randn(rows, width, generator=g)
            y = (torch.rand(rows, generator=g) > 0.5).float()
            for _ in range(3):
                opt.zero_grad()
                out = model(x).squeeze(1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(out, y)
                loss.backward()
                opt.step()
                h.update(loss.detach().numpy().tobytes())
                h.update(torch.sigmoid(out).detach().numpy().tobytes())
            for p in model.parameters():
                h.update(p.detach().numpy().tobytes())
        big = torch.randn(300, 300, generator=g)
        h.update((big @ big.T).numpy().tobytes())
        h.update(torch.log_softmax(big, dim=1).numpy().tobytes())
        h.update(torch.randn(1000, generator=g).numpy().tobytes())
        h.update(torch.normal(0.0, 1.5, (1000,), generator=g).numpy().tobytes())
        h.update(big.sum().numpy().tobytes() + big.exp().mean(dim=0).numpy().tobytes())
        rng = np.random.default_rng(0)
        a = rng.standard_normal((200, 200))
        h.update((a @ a.T).tobytes() + a.sum(axis=0).tobytes() + np.exp(a).tobytes() + np.log1p(np.abs(a)).tobytes())
        h.update(rng.normal(size=1000).tobytes() + np.linalg.norm(a, axis=1).tobytes())
        return h.hexdigest()
    finally:
        torch.set_num_threads(threads)


def fingerprint() -> dict[str, Any]:
    """What decides this machine's float results (see the module docstring)."""
    import torch

    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_mkl": bool(torch.backends.mkl.is_available()),
        "torch_mkldnn": bool(torch.backends.mkldnn.is_available()),
        "cpu": _cpu(),
        "numpy_blas": _blas(),
        "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
        "probe": probe(),
    }


def same_numerics(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a == b


def model_summary(arrays: dict[str, np.ndarray]) -> list[float]:
    """A model as a few float64 numbers that any real change moves: per tensor its sum, its L2 norm
    and its dot product with a fixed pseudo-random vector (the same for every run)."""
    out: list[float] = []
    for name in arrays:
        v = np.asarray(arrays[name], dtype=np.float64).ravel()
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
        w = np.random.default_rng(seed).standard_normal(v.size)
        out += [float(v.sum()), float(np.sqrt(np.dot(v, v))), float(np.dot(v, w))]
    return out


def compare(fresh: Any, recorded: Any, exact: bool, path: str = "") -> list[str]:
    """Where ``fresh`` differs from ``recorded``: bit for bit if ``exact``, else within the tolerance
    (digests skipped, everything but floats still exactly). Each entry names the key path."""
    if exact:
        if fresh == recorded:
            return []
        if not (isinstance(fresh, (dict, list)) and type(fresh) is type(recorded)):
            return [f"{path or '/'}: {recorded!r} recorded, {fresh!r} now"]
    if isinstance(recorded, dict) and isinstance(fresh, dict):
        if set(fresh) != set(recorded):
            return [f"{path or '/'}: keys {sorted(set(recorded) ^ set(fresh))} differ"]
        return [d for k in recorded for d in (
            [] if (not exact and k.endswith(DIGEST_SUFFIX)) else compare(fresh[k], recorded[k], exact, f"{path}/{k}"))]
    if isinstance(recorded, list) and isinstance(fresh, list):
        if len(fresh) != len(recorded):
            return [f"{path}: {len(recorded)} items recorded, {len(fresh)} now"]
        return [d for i, (f, r) in enumerate(zip(fresh, recorded)) for d in compare(f, r, exact, f"{path}[{i}]")]
    if isinstance(recorded, float) and isinstance(fresh, (int, float)) and not isinstance(fresh, bool):
        if math.isclose(float(fresh), recorded, rel_tol=RTOL, abs_tol=ATOL):
            return []
        return [f"{path}: {recorded!r} recorded, {fresh!r} now (beyond rtol {RTOL:g}, atol {ATOL:g})"]
    if fresh == recorded and type(fresh) is type(recorded):
        return []
    return [f"{path}: {recorded!r} recorded, {fresh!r} now"]


def largest_drift(fresh: Any, recorded: Any) -> float:
    """The largest relative difference between two summaries' floats (0.0 if they are equal)."""
    if isinstance(recorded, dict) and isinstance(fresh, dict):
        return max((largest_drift(fresh[k], recorded[k]) for k in recorded if k in fresh), default=0.0)
    if isinstance(recorded, list) and isinstance(fresh, list):
        return max((largest_drift(f, r) for f, r in zip(fresh, recorded)), default=0.0)
    if isinstance(recorded, float) and isinstance(fresh, float) and recorded != fresh:
        return abs(fresh - recorded) / max(abs(recorded), abs(fresh), 1e-300)
    return 0.0
