"""The code changes no number: a fixed grid of seeded runs matches its recorded values.

The grid (``tests/regression_grid.py``) covers plain, secure aggregation (with and without
dropouts), Paillier, DP-SGD, central DP, FedProx with stragglers, Multi-Krum and the median
under attack, and norm bounding under secure aggregation, on finance and medical.

Bit for bit where this machine's numerics fingerprint is the recording machine's
(``tests/data/regression_grid.numerics.json``), within :data:`tests.numerics.RTOL` where it is not
(another CPU, BLAS or kernel path: last-bit drift, measured below). The tests after the grid show
that each comparison fails when it should: a one-ULP change on the same numerics, a changed seed on
any, and that another kernel path really is compared within the tolerance and passes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import numerics
from tests import regression_grid as grid

REPO = Path(__file__).resolve().parents[2]
RECORDED = json.loads(grid.RECORD.read_text())
RECORDED_NUMERICS = json.loads(grid.NUMERICS.read_text())


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return grid.make_keys(tmp_path_factory.mktemp("regression-keys"))


@pytest.fixture(scope="module")
def exact() -> bool:
    """Bit for bit only on the recording machine's numerics."""
    return numerics.same_numerics(numerics.fingerprint(), RECORDED_NUMERICS)


def test_grid_is_recorded_for_every_case() -> None:
    assert sorted(RECORDED) == sorted(grid.case_ids())
    for case in RECORDED.values():
        assert case["final_model_summary"] is None or len(case["final_model_summary"]) >= 3
    assert RECORDED_NUMERICS["probe"] and RECORDED_NUMERICS["torch_cpu_capability"]


def check(fresh: dict, recorded: dict, exact: bool) -> None:
    diffs = numerics.compare(fresh, recorded, exact)
    mode = "bit for bit" if exact else f"within rtol {numerics.RTOL:g} (numerics differ from the recording machine's)"
    assert not diffs, f"compared {mode}: " + "; ".join(diffs[:8])


#: The heaviest cases run in the full suite only (the fast tier keeps the other 18, README).
SLOW_CASES = ("medical/dpsgd", "finance/paillier")


@pytest.mark.parametrize("case_id", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c
                                     for c in grid.case_ids()])
def test_case_matches_its_recorded_numbers(case_id: str, tmp_path: Path, key_files: tuple[Path, Path],
                                           exact: bool) -> None:
    fresh = grid.normalise(grid.run_case(case_id, tmp_path, key_files))
    check(fresh, RECORDED[case_id], exact)


@pytest.mark.parametrize("key", ["final/loss", "rounds/1/train/train_loss", "final_model_summary/0"])
def test_one_ulp_off_fails_on_the_same_numerics(key: str) -> None:
    """Every case's record against itself with one float moved by one ULP: the bit-for-bit comparison
    names it (the tolerance cannot see it, which is why it is used only where numerics differ)."""
    where = re.sub(r"/(\d+)", r"[\1]", "/" + key)
    moved_cases = 0
    for case_id, case in RECORDED.items():
        moved = json.loads(json.dumps(case))
        parent, last = moved, key.split("/")[-1]
        for part in key.split("/")[:-1]:
            parent = parent[int(part) if part.isdigit() else part]
        if parent is None or (isinstance(parent, dict) and last not in parent):
            continue
        index = int(last) if last.isdigit() else last
        parent[index] = float(np.nextafter(parent[index], np.inf))
        diffs = numerics.compare(moved, case, exact=True)
        assert len(diffs) == 1 and diffs[0].startswith(f"{where}: "), (case_id, diffs)
        assert numerics.compare(moved, case, exact=False) == []
        with pytest.raises(AssertionError, match="bit for bit"):
            check(moved, case, exact=True)
        moved_cases += 1
    assert moved_cases >= len(RECORDED) - 2  # (two cases keep no plaintext model at the coordinator)


@pytest.mark.parametrize("extra", [("seed=1",), ("task.lr=0.0505",)], ids=["seed", "lr+1%"])
def test_a_changed_run_fails_even_within_the_tolerance(extra: tuple[str, ...], tmp_path: Path,
                                                       key_files: tuple[Path, Path]) -> None:
    """A real change of behaviour (another seed; a learning rate 1 % higher) is far beyond the tolerance."""
    fresh = grid.normalise(grid.run_case("finance/plain", tmp_path, key_files, extra=extra))
    with pytest.raises(AssertionError, match="beyond rtol"):
        check(fresh, RECORDED["finance/plain"], exact=False)


@pytest.mark.slow
def test_another_kernel_path_is_compared_within_the_tolerance_and_passes() -> None:
    """torch's scalar kernels (ATEN_CPU_CAPABILITY=default) stand in for another machine: the
    fingerprint differs, the numbers drift in their last bits, and the grid passes within the tolerance."""
    cases = ["finance/dpsgd", "finance/secagg", "medical/plain"]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-m", "tests.regression_grid", "--only", *cases], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert "numerics differ from the recording machine's" in out.stdout, out.stdout[-3000:]
    assert out.returncode == 0 and f"{len(cases)} of {len(cases)} cases the same" in out.stdout, out.stdout[-3000:]
    drifts = [float(d) for d in re.findall(r"largest relative drift ([0-9.e+-]+)", out.stdout)]
    assert len(drifts) == len(cases) and max(drifts) > 0, out.stdout[-3000:]  # the path really changed numbers
