"""The secure-aggregation state machines in memory: exact sums over rounds, dropouts, resumption from the
saved state, the ratchet, and the threshold bound against a deviating coordinator checked exhaustively."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from aggregation.base import MaskingLimits
from aggregation.secagg import ratchet
from aggregation.secagg.codec import FieldCodec
from aggregation.secagg.graph import graph_seed, neighbourhood
from aggregation.secagg.protocol import Masked, MaskingServer, MaskingSite, Refused, SecAggAbort, SiteState, site_threshold
from core.identity import IdentityError, SiteIdentity, load_roster, provision

D = 300
CODEC = FieldCodec(clip=2.0, value_bits=20, max_sites=8)
NAMES = [f"site-{i}" for i in range(5)]
X = {f"site-{k}": np.random.default_rng(k).uniform(-2, 2, size=D) for k in range(8)}


def federation(names: list[str] = NAMES, k: int = 99, identities: dict[str, SiteIdentity] | None = None,
               limits: MaskingLimits | None = None) -> dict[str, MaskingSite]:
    """Every site with the keys of epoch 1 agreed."""
    sites = {n: MaskingSite((identities or {}).get(n) or SiteIdentity.simulated(n), 7, "train", SiteState(),
                            limits or MaskingLimits()) for n in names}
    published = {n: s.advertise(1) for n, s in sites.items()}
    for s in sites.values():
        s.agree(1, names, published, k)
    return sites


def round_of(sites: dict[str, MaskingSite], index: int, absent: set[str] = frozenset(),
             silent: set[str] = frozenset(), k: int = 99) -> tuple[np.ndarray, list[str]]:
    """One round: ``absent`` sites never mask, ``silent`` ones mask but do not unmask."""
    names = sorted(sites)
    graph = neighbourhood(b"", names, k) if k < len(names) - 1 else {n: frozenset(names) - {n} for n in names}
    hoods = {n: sorted(set(sites[n].state.allowed) & set(names)) for n in names}
    assert all(set(hoods[n]) == graph[n] or k < len(names) - 1 for n in names)
    server = MaskingServer(CODEC, D, hoods)
    for n in names:
        if n in absent:
            continue
        enc, _ = CODEC.encode(X[n], np.random.default_rng(index))
        y, t, shares = sites[n].mask(index, hoods[n], enc, CODEC, 0.6)
        server.masked[n] = Masked(y, t, shares)
    replies = {}
    for n, (surv, drop, inbox) in server.requests().items():
        if n not in silent:
            replies[n] = sites[n].unmask(index, surv, drop, inbox)
    total = server.unmask(replies)
    survivors = sorted(server.masked)
    return CODEC.decode_sum(total, len(survivors)), survivors


def expected(survivors: list[str], index: int) -> np.ndarray:
    return sum(CODEC.decode_sum(CODEC.encode(X[n], np.random.default_rng(index))[0], 1) for n in survivors)


def test_rounds_sum_exactly_with_one_key_agreement() -> None:
    sites = federation()
    for r in (1, 2, 3):
        total, survivors = round_of(sites, r)
        assert survivors == NAMES
        np.testing.assert_allclose(total, expected(NAMES, r), atol=1e-9)
    assert all(s.state.secret == b"" for s in sites.values())  # the epoch's X25519 keys are gone


def test_dropped_sites_masks_are_removed_by_the_seeds_of_that_round_only() -> None:
    sites = federation()
    total, survivors = round_of(sites, 1, absent={"site-1"})
    np.testing.assert_allclose(total, expected(survivors, 1), atol=1e-9)
    # the dropped site comes back two rounds later: its chains ratchet forward over the gap
    total, survivors = round_of(sites, 4)
    assert survivors == NAMES
    np.testing.assert_allclose(total, expected(NAMES, 4), atol=1e-9)


def test_a_silent_survivor_is_in_the_sum_down_to_the_threshold() -> None:
    total, survivors = round_of(federation(), 1, silent={"site-0"})
    np.testing.assert_allclose(total, expected(NAMES, 1), atol=1e-9)


def test_a_dropout_beside_a_silent_neighbour_aborts_the_round_and_reveals_no_sum() -> None:
    """The one case the ratchet cannot recover: site 1 dropped before masking and site 0, its neighbour,
    masked but did not unmask; only 0 and 1 hold their pair's round seed. (7 sites: site 0's self-mask
    still has its threshold of 5 shares.)"""
    with pytest.raises(SecAggAbort, match="did not reveal its mask with site-1"):
        round_of(federation(sorted(X)[:7]), 1, absent={"site-1"}, silent={"site-0"})


def test_a_site_resumes_from_its_saved_state() -> None:
    """A site restarted between its masked input and the unmasking (state written, process gone): the
    state read back unmasks the round, and the next round still sums exactly."""
    sites = federation()
    enc = {n: CODEC.encode(X[n], np.random.default_rng(1))[0] for n in NAMES}
    hoods = {n: sorted(set(NAMES) - {n}) for n in NAMES}
    server = MaskingServer(CODEC, D, hoods)
    for n in NAMES:
        server.masked[n] = Masked(*sites[n].mask(1, hoods[n], enc[n], CODEC, 0.6))
    saved = sites["site-2"].state.to_bytes()
    sites["site-2"] = MaskingSite(SiteIdentity.simulated("site-2"), 7, "train", SiteState.from_bytes(saved))
    replies = {n: sites[n].unmask(1, *server.requests()[n]) for n in NAMES}
    np.testing.assert_allclose(CODEC.decode_sum(server.unmask(replies), 5), expected(NAMES, 1), atol=1e-9)
    total, _ = round_of(sites, 2)
    np.testing.assert_allclose(total, expected(NAMES, 2), atol=1e-9)
    with pytest.raises(Refused, match="damaged"):
        SiteState.from_bytes(saved[:-3])


def test_a_sparse_graph_is_the_same_at_every_site_and_the_coordinator() -> None:
    names = [f"s{i:02d}" for i in range(12)]
    graph = neighbourhood(b"seed", names, 4)
    assert all(len(g) == 4 and n not in g for n, g in graph.items())
    assert all(n in graph[m] for n in names for m in graph[n])  # symmetric
    assert graph == neighbourhood(b"seed", list(reversed(names)), 4)  # order of the list does not matter
    assert graph != neighbourhood(b"other", names, 4)
    sites = federation(names, k=4)
    assert all(set(s.state.allowed) == graph_of(names, n) for n, s in sites.items())


def graph_of(names: list[str], me: str) -> set[str]:
    return set(neighbourhood(graph_seed(7, "train", 1), sorted(names), 4)[me])


def test_the_ratchet_goes_forward_only_and_its_keys_differ_per_round() -> None:
    root = bytes(range(32))
    keys = [ratchet.round_keys(ratchet.advance(root, 0, r), r) for r in range(5)]
    assert len({k for triple in keys for k in triple}) == 15  # mask seeds, share keys, next chain keys all differ
    assert ratchet.advance(ratchet.advance(root, 0, 2), 2, 4) == ratchet.advance(root, 0, 4)
    assert keys[2][2] == ratchet.advance(root, 0, 3)  # the next chain key is the chain at the next index
    with pytest.raises(ValueError, match="never goes back"):
        ratchet.advance(root, 3, 2)
    with pytest.raises(ValueError, match="steps ahead"):
        ratchet.advance(root, 0, ratchet.MAX_STEPS + 1)


def test_keys_of_an_old_epoch_or_without_an_unused_key_are_refused() -> None:
    sites = federation(NAMES[:3])
    with pytest.raises(Refused, match="already holds the keys of epoch 1"):
        sites["site-0"].advertise(1)
    with pytest.raises(Refused, match="no unused key of that epoch"):
        sites["site-0"].agree(1, NAMES[:3], {}, 99)
    fresh = MaskingSite(SiteIdentity.simulated("site-9"), 7, "train", SiteState())
    public = fresh.advertise(1)
    with pytest.raises(Refused, match="keys of 1 of this site's 1 neighbours are missing"):
        fresh.agree(1, ["site-8", "site-9"], {"site-9": public}, 99)


def test_a_roster_site_verifies_its_neighbours_and_refuses_a_stranger(tmp_path: Path) -> None:
    paths = provision(tmp_path, NAMES[:3])
    ids = {n: SiteIdentity.load(n, *paths[n]) for n in NAMES[:3]}
    assert set(load_roster(paths["site-0"][1])) == set(NAMES[:3])
    sites = federation(NAMES[:3], identities=ids)
    total, _ = round_of(sites, 1)
    np.testing.assert_allclose(total, expected(NAMES[:3], 1), atol=1e-9)
    # a name the roster does not list, with a self-made identity: refused before any agreement
    intruder = MaskingSite(SiteIdentity.simulated("intruder"), 7, "train", SiteState())
    newcomer = MaskingSite(ids["site-0"], 7, "train", SiteState(epoch=1, last=1))
    keys = {"intruder": intruder.advertise(2), "site-0": newcomer.advertise(2)}
    with pytest.raises(Refused, match="not on this site's roster"):
        newcomer.agree(2, ["intruder", "site-0"], keys, 99)
    with pytest.raises(IdentityError, match="does not list this site"):
        SiteIdentity.load("site-7", *paths["site-0"])
    # the consortium removes site 2 from the roster: site 0 masks with it no more, even with its chains
    assert ids["site-0"].roster is not None
    del ids["site-0"].roster["site-2"]
    enc, _ = CODEC.encode(X["site-0"], np.random.default_rng(0))
    with pytest.raises(Refused, match="no longer on this site's roster"):
        sites["site-0"].mask(2, ["site-1", "site-2"], enc, CODEC, 0.6)


# ---- the threshold bound, checked against every strategy of a coordinator with c sites of its own -------
def coordinator_can_read(n: int, c: int, t: int) -> bool:
    """Can a coordinator controlling ``c`` of site j's ``n - 1`` neighbours learn j's input alone?

    It needs j's self-mask (``t`` shares of b_j) and every pair seed of j. It chooses j's view (which of j's
    neighbours "survived", at least ``t`` with j; j reveals the seeds of the others) and tells each honest
    neighbour h either "j survived" (h gives its share of b_j) or "j dropped" (h gives the pair's seed;
    h accepts only if its own neighbourhood can still show ``t`` survivors without j). Colluders give all.
    Exhaustive over all views and all tellings."""
    others = list(range(n - 1))
    colluders = set(range(c))
    honest = [h for h in others if h not in colluders]
    for survived in itertools.product((True, False), repeat=n - 1):  # j's view of each neighbour
        view = {o for o, s in zip(others, survived, strict=True) if s}
        if len(view) + 1 < t:
            continue  # j refuses: too few survivors
        for told_survived in itertools.product((True, False), repeat=len(honest)):
            told = dict(zip(honest, told_survived, strict=True))
            if any(not s and n - 1 < t for s in told.values()):
                continue  # h cannot be shown t survivors without j
            # every pair seed: j gives those it was told dropped; an honest h in j's view must give it itself
            if any(h in view and told[h] for h in honest):
                continue
            b_shares = 1 + c + sum(1 for h in honest if told[h])  # j's own, the colluders', honest "survived"
            if b_shares >= t:
                return True
    return False


@pytest.mark.parametrize("n", range(3, 9))
def test_the_sites_threshold_defeats_every_coordinator_strategy_and_is_the_least_that_does(n: int) -> None:
    for c in range(0, n - 2):
        t = site_threshold(n, 0.5, MaskingLimits(colluders=c))
        if t > n:  # the policy's colluders do not fit this neighbourhood: the site refuses to mask
            continue
        assert not coordinator_can_read(n, c, t), (n, c, t)
        if t - 1 >= 2:
            assert coordinator_can_read(n, c, t - 1), (n, c, t - 1)  # one less would be read


def test_a_site_refuses_a_neighbourhood_its_policy_cannot_protect() -> None:
    sites = federation(NAMES[:4], limits=MaskingLimits(colluders=2))  # n = 4: threshold 4, fine (no dropouts)
    enc, _ = CODEC.encode(X["site-0"], np.random.default_rng(0))
    _, t, _ = sites["site-0"].mask(1, ["site-1", "site-2", "site-3"], enc, CODEC, 0.6)
    assert t == 4
    with pytest.raises(Refused, match="cannot hold a threshold of 4"):
        sites["site-1"].mask(1, ["site-2", "site-3"], enc, CODEC, 0.6)  # n = 3 with 2 colluders allowed


def test_fedsilo_keys_roster_writes_private_keys_and_one_roster(tmp_path: Path) -> None:
    from app.cli.keys import main

    assert main(["roster", "--out", str(tmp_path), "--sites", "bank-a", "bank-b"]) == 0
    roster = load_roster(tmp_path / "roster.json")
    assert set(roster) == {"bank-a", "bank-b"}
    for name in roster:
        assert (tmp_path / name / "site.key").stat().st_mode & 0o777 == 0o600
        assert SiteIdentity.load(name, tmp_path / name / "site.key", tmp_path / "roster.json").public() == roster[name]
    assert main(["roster", "--out", str(tmp_path / "x"), "--sites", "bank-a", "bank-a"]) == 2
