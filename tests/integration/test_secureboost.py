"""``vertical=secureboost`` through the real ServerApp and ClientApp (in process), and the parties' refusals of a
coordinator that deviates.

With ``min_bin_rows=0`` the trees are node for node those the same trainer grows on the joined columns in one
place (every sum is of integers: exact): the reference below grows them from :mod:`learners.gbdt`'s functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.runtime.local_grid import run_inprocess
from learners.gbdt.program import decide_node, local_cuts
from learners.gbdt.trees import BITS, SplitRule, Tree, bin_matrix, gradients
from tests.conftest import DATA_DIR
from tests.integration.test_vertical import overrides, small_files
from tests.integration.test_vertical_deviating import ROLES, Relay, _envs, _session
from vertical import party, secureboost
from vertical.config import BoostConfig, VerticalConfig
from vertical.coordinator import intersect
from vertical.data import load_party

SCHEMAS = {"bank": DATA_DIR / "schemas/credit_vertical_bank.yaml",
           "platform": DATA_DIR / "schemas/credit_vertical_platform.yaml"}
TREES = ("vertical.epochs=3", "vertical.boost.max_depth=3", "vertical.workers=1")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return small_files(tmp_path_factory.mktemp("secureboost"))


@pytest.fixture(scope="module")
def exact(small: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("sb-exact")
    return run_inprocess(overrides(small, "secureboost", *TREES, "vertical.boost.min_bin_rows=0"), out), out


def parts(out: Path) -> dict[str, dict[str, Any]]:
    """Each party's saved part of the model."""
    got = {}
    for name in ROLES:
        with np.load(out / "parties" / f"{name}.vertical.npz") as z:
            got[name] = json.loads(bytes(z["model"]).decode())
    return got


def joined(small: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, int]:
    """The common customers' columns, the bank's then the platform's, and their labels (any row order)."""
    bank = load_party("bank", "active", small["bank"], SCHEMAS["bank"])
    plat = load_party("platform", "passive", small["platform"], SCHEMAS["platform"])
    at = {i: k for k, i in enumerate(plat.ids)}
    rows = [(k, at[i]) for k, i in enumerate(bank.ids) if i in at]
    xa, xb = bank.x[[r[0] for r in rows]], plat.x[[r[1] for r in rows]]
    assert bank.y is not None
    return np.column_stack([xa, xb]), bank.y[[r[0] for r in rows]], xa.shape[1]


def pooled_trees(x: np.ndarray, y: np.ndarray, fa: int, trees: int, depth: int) -> tuple[list[Tree], float]:
    """The same trees grown in one place on the joined columns (each party's cut points are its own columns')."""
    b = BoostConfig()
    cuts = local_cuts(x[:, :fa], b.max_bin, b.grid_cells) + local_cuts(x[:, fa:], b.max_bin, b.grid_cells)
    bins = bin_matrix(x, cuts)
    rule = SplitRule(b.reg_lambda, b.gamma, b.min_child_weight, b.eta)
    base = float(np.log(y.mean() / (1 - y.mean())))
    margins, out = np.full(len(y), base), []
    width = max(len(c) + 2 for c in cuts)
    for _ in range(trees):
        g, h = gradients("binary", y, margins[:, None], BITS)
        tree = Tree()
        tree.value[0] = tree.threshold[0] = rule.weight(float(g.sum()), float(h.sum()))
        where, open_nodes = np.zeros(len(y), dtype=np.int64), [0]
        for d in range(depth):
            nxt = []
            for node in open_nodes:
                sel = where == node
                gh, hh = np.zeros((len(cuts), width)), np.zeros((len(cuts), width))
                for f, c in enumerate(cuts):
                    gh[f, :len(c) + 2] = np.bincount(bins[sel, f], weights=g[sel, 0], minlength=len(c) + 2)
                    hh[f, :len(c) + 2] = np.bincount(bins[sel, f], weights=h[sel, 0], minlength=len(c) + 2)
                f, j, dl, gain, _, vl, vr, *_ = decide_node(gh, hh, [len(c) for c in cuts], np.arange(len(cuts)), rule,
                                                            False)
                if f < 0:
                    continue
                f, j = int(f), int(j)
                left, right = tree.add_children(node, f, j, float(cuts[f][j - 1]), bool(dl), float(gain),
                                                (float(vl), float(vr)), (0.0, 0.0))
                col, idx = bins[sel, f], np.flatnonzero(sel)
                go = np.where(col == 0, bool(dl), col <= j)
                where[idx[go]], where[idx[~go]] = left, right
                if d + 1 < depth:
                    nxt += [left, right]
            open_nodes = nxt
        margins += np.asarray(tree.value)[where]
        out.append(tree)
    return out, base


def as_joined(model: dict[str, dict[str, Any]], fa: int) -> list[Tree]:
    """The vertical trees with each platform split id resolved through the platform's own split table."""
    splits = model["platform"]["splits"]
    out = []
    for part in model["bank"]["trees"]:
        t = Tree.from_dict(part["tree"])
        for n, who in enumerate(part["owner"]):
            if who:
                s = splits[t.split_bin[n]]
                t.feature[n], t.split_bin[n], t.threshold[n] = fa + s["feature"], s["bin"], s["threshold"]
        out.append(t)
    return out


def test_secureboost_grows_the_trees_of_the_joined_columns_node_for_node(exact, small) -> None:
    res, out = exact
    assert res["status"] == "completed" and res["vertical"]["intersection"] == {"train": 400, "test": 300}
    model = parts(out)
    x, y, fa = joined(small)
    want, base = pooled_trees(x, y, fa, 3, 3)
    got = as_joined(model, fa)
    assert model["bank"]["base"] == base
    owners = [w for part in model["bank"]["trees"] for w in part["owner"]]
    assert "platform" in owners and "" in owners  # both parties' columns were split on
    for g, w in zip(got, want, strict=True):
        for key in ("left", "right", "feature", "split_bin", "default_left", "value", "threshold"):
            assert getattr(g, key) == getattr(w, key), key
    # no hessian sums are kept in the model by default (TimberStrike)
    assert all(c == 0.0 for part in model["bank"]["trees"] for c in part["tree"]["cover"])
    # the held-out customers' AUC is that of the same trees scored on the joined test columns
    bank_t = load_party("bank", "active", small["bank_test"], SCHEMAS["bank"],
                        load_party("bank", "active", small["bank"], SCHEMAS["bank"]).prep)
    plat_t = load_party("platform", "passive", small["platform_test"], SCHEMAS["platform"],
                        load_party("platform", "passive", small["platform"], SCHEMAS["platform"]).prep)
    at = {i: k for k, i in enumerate(plat_t.ids)}
    rows = [(k, at[i]) for k, i in enumerate(bank_t.ids) if i in at]
    xt = np.column_stack([bank_t.x[[r[0] for r in rows]], plat_t.x[[r[1] for r in rows]]])
    assert bank_t.y is not None
    m = base + sum(np.asarray(t.value)[t.leaf_of_values(xt)] for t in want)
    from sklearn.metrics import roc_auc_score

    assert res["vertical"]["final"]["auc"] == pytest.approx(roc_auc_score(bank_t.y[[r[0] for r in rows]], m), abs=1e-12)


@pytest.mark.slow
def test_a_saved_secureboost_model_scores_with_its_parts(exact, small, tmp_path) -> None:
    res, out = exact
    scored = run_inprocess(overrides(small, "secureboost", *TREES, "vertical.mode=score", f"vertical.model_dir={out}",
                                     f"vertical.score=[{small['bank_test']},{small['platform_test']}]"), tmp_path)
    assert scored["status"] == "completed"
    assert scored["vertical"]["score"]["auc"] == pytest.approx(res["vertical"]["final"]["auc"], abs=1e-12)
    lines = Path(scored["vertical"]["score"]["scores_file"]).read_text().splitlines()
    assert lines[0] == "id,score" and len(lines) == 301


@pytest.mark.slow
def test_the_first_trees_on_the_banks_columns_only_and_bins_of_too_few_rows_merged(small, tmp_path) -> None:
    res = run_inprocess(overrides(small, "secureboost", *TREES, "vertical.boost.active_trees=2",
                                  "vertical.boost.min_bin_rows=40", "vertical.boost.keep_hessians=true"), tmp_path)
    assert res["status"] == "completed"
    model = parts(tmp_path)
    owners = [part["owner"] for part in model["bank"]["trees"]]
    assert not any(owners[0]) and not any(owners[1]) and "platform" in owners[2]
    # the platform received the gradients of one tree only (the third)
    assert res["vertical"]["epochs"][0]["bytes"].get("bank->platform", 0) == 0
    assert res["vertical"]["epochs"][2]["bytes"]["bank->platform"] > 400 * 512
    assert any(c > 0 for c in model["bank"]["trees"][0]["tree"]["cover"])  # kept when asked
    assert res["vertical"]["final"]["auc"] > 0.6


@pytest.mark.parametrize(("counts", "missing", "k", "want"), [
    ([5, 0, 7, 30, 1], 0, 0, [1, 2, 3, 4, 5]),     # off: every bin alone
    ([5, 0, 7, 30, 1], 0, 10, [3, 5]),             # 12 rows, then 31 (the short tail joins the last group)
    ([5, 0, 7, 30, 1], 3, 10, []),                  # 3 missing rows: their sum would cover 3 rows
    ([5, 0, 7, 30, 1], 12, 10, [3, 5]),
    ([5, 4], 0, 10, []),                            # one group only: nothing to split
])
def test_bin_groups_hold_at_least_min_bin_rows(counts, missing, k, want) -> None:
    his = secureboost.groups(np.asarray(counts), missing, k)
    assert his == want
    lo = 1
    for hi in his:
        assert k == 0 or sum(counts[lo - 1:hi]) >= k
        lo = hi + 1


def test_packed_fields_round_trip_signed() -> None:
    g, h = np.array([-(1 << 24), 3, 0, (1 << 24) - 1]), np.array([1, 1 << 22, 5, 0])
    for a, b, v in zip(g, h, secureboost.pack_fields(g, h)):
        assert secureboost.unpack_fields(v, 2) == [a, b]
    assert secureboost.unpack_fields(int(g.sum()) + (int(h.sum()) << 48), 2) == [int(g.sum()), int(h.sum())]


# ---- a coordinator that deviates ---------------------------------------------------------------------
def _one_level(tmp_path: Path, small: dict[str, Path]) -> tuple[Relay, Any]:
    envs = _envs(tmp_path, small)
    cfg = VerticalConfig(key_bits=1024, epochs=2, batch_size=0, workers=1,
                         boost=BoostConfig(max_depth=2, min_bin_rows=20))
    envs = {n: party.PartyEnv(**{**e.__dict__, "cfg": cfg, "test": str(small[f"{n}_test"])}) for n, e in envs.items()}
    relay = Relay(envs)
    s = _session(relay)
    intersect(s, "train", "fedsilo-psi-v1|run-7", 100)
    intersect(s, "test", "fedsilo-psi-v1|run-7", 1)
    secureboost._setup(s)
    secureboost._step(s, 1, 0, None)
    return relay, s


def test_the_bank_decrypts_only_this_levels_histograms_once(tmp_path: Path, small: dict[str, Path]) -> None:
    relay, s = _one_level(tmp_path, small)
    bank, env = relay.states["bank"], relay.envs["bank"]
    # tree 1 is done; a second tree starts; its level 0 is under way
    r = relay.call("bank", "sb.tree", {"tree": 2})
    hist = relay.call("platform", "sb.hist", {"tree": 2, "depth": 0, "active": "bank", "n": s.keys["bank"]["n:platform"],
                                              "nodes": r["nodes:platform"], "gh": r["gh:platform"]})
    # tree 1's histogram (bound to its level), offered now: it does not open
    old = next(p["hist:platform"] for step, n, p in relay.sent if step == "sb.split")
    with pytest.raises(party.StepError, match="does not open"):
        party.handle("sb.split", {"tree": 2, "depth": 0, "hist:platform": old}, bank, env)
    # the bank's own gradient ciphertexts, relayed back as a "histogram": not the platform's object
    with pytest.raises(party.StepError, match="does not open"):
        party.handle("sb.split", {"tree": 2, "depth": 0, "hist:platform": r["gh:platform"]}, bank, env)
    relay.call("bank", "sb.split", {"tree": 2, "depth": 0, "hist:platform": hist["sealed"]})
    with pytest.raises(party.StepError, match="does not do it twice"):
        party.handle("sb.split", {"tree": 2, "depth": 0, "hist:platform": hist["sealed"]}, bank, env)
    # a tree is started once, in order
    with pytest.raises(party.StepError, match="does not follow"):
        party.handle("sb.tree", {"tree": 2}, bank, env)


def test_the_platform_serves_each_level_once_and_in_order(tmp_path: Path, small: dict[str, Path]) -> None:
    relay, s = _one_level(tmp_path, small)
    plat, env = relay.states["platform"], relay.envs["platform"]
    first = next(p for step, n, p in relay.sent if step == "sb.hist" and p["depth"] == 0)
    with pytest.raises(party.StepError, match="does not follow"):
        party.handle("sb.hist", dict(first), plat, env)  # a level again: the same sums, or new nodes for old rows
    # a split request for a level it did not send (replayed), and one for a node that is not open
    ask = next(p for step, n, p in relay.sent if step == "sb.apply")
    with pytest.raises(party.StepError, match="not the level|does not do it twice|does not open"):
        party.handle("sb.apply", dict(ask), plat, env)
    # the held-out rows are routed after each tree at most (its own config: 2 trees), then refused
    for _ in range(2):
        secureboost._score(s, "test", False)
    with pytest.raises(party.StepError, match="after each of the run's 2 trees"):
        party.handle("sb.partial", {"which": "test", "active": "bank"}, plat, env)
    splits = json.loads(str(plat["sb:splits"]))
    assert splits and all(set(sp) == {"feature", "bin", "threshold", "default_left"} for sp in splits)
    # nothing the coordinator relayed carries a gradient in the clear or the bank's key
    p, q = party.get_ints(relay.states["bank"], "sb:pq")
    sent = json.dumps([(step, n, {k: (v.hex() if isinstance(v, bytes) else v) for k, v in pl.items()})
                       for step, n, pl in relay.sent])
    assert format(p * q, "x") not in sent and format(p, "x") not in sent
