"""Vertical SecureBoost (Cheng et al. 2021, as FATE's hetero SecureBoost): boosted trees on every party's
columns, the label only at the active party. Both halves.

The trees are ``learner=gbdt``'s (:mod:`learners.gbdt`): the same gradients (multiples of ``2^-24``), cut
points (each party's own, by the sketch a federation of one would decide: :func:`learners.gbdt.program.local_cuts`),
split rule and leaf values (:func:`learners.gbdt.program.decide_node`). Every sum is of integers, so with
``vertical.boost.min_bin_rows=0`` the model is, node for node, the trees the same trainer grows on the joined
columns in one place (tested).

One tree (coordinator: :func:`_step`), an active party A (labels, its columns, its own Paillier key for the
run) and passive parties B (columns):

1. ``sb.tree`` (A): the gradient ``g`` and hessian ``h`` of every common customer, as integers, packed into
   one plaintext ``g + h * 2^48`` and encrypted under A's key; sealed to each B (bound to the tree) with the
   rows' nodes (all at the root).
2. per level, ``sb.hist`` (each B): for each open node and each of its features, the encrypted sums of the
   node's rows in each bin, by homomorphic additions (B never sees a gradient); bins with fewer than
   ``min_bin_rows`` of the node's rows merged with their neighbours, a feature whose missing values in the
   node are that few left out; many sums packed into one ciphertext (``c^(2^96) * c'``); sealed to A.
3. ``sb.split`` (A): decrypts (only what a passive party sealed to it for this level, once), adds its own
   columns' histograms (in the clear) and picks each node's best split; a split on B's column goes to B
   as (node, B's feature, group), which B alone can turn into a threshold.
4. ``sb.apply`` (B): keeps the threshold under an opaque split id and tells A (sealed) which of the node's
   rows go left.
5. ``sb.route`` (A): moves the rows to the children; the next level's open nodes to each B (sealed), or
   the tree's end: A computes the leaf values from its own ``g``, ``h`` and updates its margins.

Scoring (after every tree on the held-out customers, and in a scoring run): each B sends, sealed to A, for
each of its split ids which aligned rows go left; A walks the trees. The model is in parts: A's trees
(its own thresholds, B's nodes as (party, split id), the leaf values), each B's split table.

Who learns what (docs/vertical.md): B learns which common customers share a node at each level (the
instance space, as in SecureBoost) and its own chosen thresholds, nothing of ``g``, ``h`` or the labels;
A learns per node the gradient sums of B's bin groups (each of at least ``min_bin_rows`` rows) and, for B's
splits and at scoring, which rows go left. Leak reductions (``vertical.boost``): ``active_trees`` (the first
trees, whose instance spaces carry the most label information, on A's columns only), ``min_bin_rows``, no
hessian sums in the model (``keep_hessians=false``), ``min_child_weight``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import gmpy2
import numpy as np
from phe import paillier

from aggregation.paillier.crypto import chunks, decrypt_job, parallel_map
from learners.gbdt.program import base_margins, decide_node, local_cuts
from learners.gbdt.trees import BITS, SplitRule, Tree, as_float32, bin_matrix, gradients
from vertical import paillier_rows as pr
from vertical.coordinator import Session, Trainer, batch_score
from vertical.party import (
    PartyEnv,
    StepError,
    finish_scores,
    get_array,
    get_ints,
    once,
    open_from,
    peers,
    put_array,
    put_ints,
    read_part,
    register,
    rows,
    seal_to,
    write_part,
)

SLOT = 48            # bits of each signed field of a plaintext: a gradient sum, a hessian sum
FIELDS = 2 * SLOT    # bits of one bin's (gradient, hessian) pair
SCALE = float(1 << BITS)
MODEL = "secureboost"


# ---- shared helpers ---------------------------------------------------------------------------------
def _rule(env: PartyEnv) -> SplitRule:
    b = env.cfg.boost
    return SplitRule(b.reg_lambda, b.gamma, b.min_child_weight, b.eta)


def _role(env: PartyEnv, role: str, what: str) -> None:
    if env.role != role:
        raise StepError(f"party {env.name} is {env.role}; only the {role} party {what}")




def _cuts(state: dict[str, Any]) -> list[np.ndarray]:
    if "sb:cuts" not in state:
        raise StepError("no cut points: sb.setup did not run at this party")
    return [np.asarray(c, dtype=np.float64) for c in json.loads(str(state["sb:cuts"]))]


def _blob(header: dict[str, Any], body: bytes) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + body


def _unblob(data: bytes, what: str) -> tuple[dict[str, Any], bytes]:
    head, sep, body = data.partition(b"\n")
    try:
        header = json.loads(head)
    except ValueError:
        header = None
    if not sep or not isinstance(header, dict):
        raise StepError(f"a malformed {what}")
    return header, body


def _at(header: dict[str, Any], tree: int, depth: int, what: str) -> None:
    if header.get("tree") != tree or header.get("depth") != depth:
        raise StepError(f"{what} of tree {header.get('tree')}, depth {header.get('depth')} where tree {tree}, "
                        f"depth {depth} is under way")


def pack_fields(g: np.ndarray, h: np.ndarray) -> list[int]:
    """One plaintext per row: ``g + h * 2^SLOT`` (signed integers)."""
    return [int(a) + (int(b) << SLOT) for a, b in zip(g.tolist(), h.tolist())]


def unpack_fields(value: int, count: int) -> list[int]:
    """The ``count`` signed fields of a packed (decrypted, signed) plaintext, lowest first."""
    base, half = 1 << SLOT, 1 << (SLOT - 1)
    out = []
    for _ in range(count):
        digit = value & (base - 1)
        if digit >= half:
            digit -= base
        out.append(digit)
        value = (value - digit) >> SLOT
    if value != 0:
        raise StepError("a packed histogram with more sums than its layout says (or corrupt)")
    return out


def per_ciphertext(key_bits: int) -> int:
    """Bins (gradient and hessian sum) one ciphertext carries below ``n / 2``."""
    return max(1, (key_bits - 2) // FIELDS)


# ---- the passive party's histograms ---------------------------------------------------------------
def bin_products_job(n2: int, cts: list[int], keys: list[np.ndarray]) -> list[dict[int, int]]:
    """Worker job: per feature, the product of the ciphertexts of the rows with each key (node, bin)."""
    m = gmpy2.mpz(n2)
    c = [gmpy2.mpz(x) for x in cts]
    out = []
    for key in keys:
        acc: dict[int, Any] = {}
        for i, k in zip(np.flatnonzero(key >= 0).tolist(), key[key >= 0].tolist()):
            a = acc.get(k)
            acc[k] = c[i] if a is None else a * c[i] % m
        out.append({k: int(v) for k, v in acc.items()})
    return out


def groups(counts: np.ndarray, missing: int, min_rows: int) -> list[int]:
    """A node's groups of consecutive bins of one feature, each holding at least ``min_rows`` of its rows, as
    the last bin of each group (``counts[b - 1]``: rows in bin ``b``); [] if fewer than two groups, or if the
    node's missing values of the feature are fewer than ``min_rows`` but not none (their sum is the node's
    total less the groups': it would cover too few rows). ``min_rows=0``: every bin is a group."""
    bins = len(counts)
    if min_rows == 0:
        return list(range(1, bins + 1)) if bins > 1 else []
    if 0 < missing < min_rows:
        return []
    his: list[int] = []
    run = 0
    for b in range(1, bins + 1):
        run += int(counts[b - 1])
        if run >= min_rows:
            his.append(b)
            run = 0
    if his:
        his[-1] = bins  # a short tail joins the last group
    return his if len(his) > 1 else []


def pack_job(n2: int, cts: list[int], per: int) -> list[int]:
    """Worker job: group sums packed ``per`` to a ciphertext: ``prod_i c_i^(2^(FIELDS * i))`` by Horner's rule."""
    if not cts:
        return []
    n2 = gmpy2.mpz(n2)
    out = []
    shift = 1 << FIELDS
    for s in range(0, len(cts), per):
        chunk = cts[s:s + per]
        acc = gmpy2.mpz(chunk[-1])
        for c in reversed(chunk[:-1]):
            acc = gmpy2.powmod(acc, shift, n2) * c % n2
        out.append(int(acc))
    return out


# ---- party steps --------------------------------------------------------------------------------------
def setup(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Once per run: bin the party's aligned rows by its own cut points; the active party makes its Paillier key
    pair, its base margin, and sends its modulus sealed to each passive party."""
    once(state, env, "sb.setup")
    b = env.cfg.boost
    x = env.table("train").x[rows(state, "train")]
    cuts = local_cuts(x, b.max_bin, b.grid_cells)
    state["sb:cuts"] = json.dumps([c.tolist() for c in cuts])
    put_array(state, "sb:bins", bin_matrix(x, cuts).astype(np.int16))
    if env.role == "passive":
        state["sb:splits"] = "[]"
        state["sb:at"] = "0|-1"
        return {}
    public, private = paillier.generate_paillier_keypair(n_length=env.cfg.key_bits)
    put_ints(state, "sb:pq", [int(private.p), int(private.q)])
    y = _labels(env, state)
    base = float(base_margins("binary", np.array([len(y), float(y.sum())]), 1)[0])
    state["sb:base"] = base
    put_array(state, "sb:margins", np.full(len(y), base))
    state["sb:trees"] = "[]"
    state["sb:tree"] = 0
    return {f"n:{p}": seal_to(state, env, p, hex(public.n).encode(), "sb-n") for p in peers(state)}


def _labels(env: PartyEnv, state: dict[str, Any]) -> np.ndarray:
    y = env.table("train").y
    if y is None:
        raise StepError(f"party {env.name} has no labels")
    return y[rows(state, "train")]


def _private(state: dict[str, Any]) -> paillier.PaillierPrivateKey:
    p, q = get_ints(state, "sb:pq")
    return paillier.PaillierPrivateKey(paillier.PaillierPublicKey(p * q), p, q)


def _grow(state: dict[str, Any]) -> tuple[Tree, list[str]]:
    d = json.loads(str(state["sb:grow"]))
    return Tree.from_dict(d["tree"]), list(d["owner"])


def _keep_grow(state: dict[str, Any], tree: Tree, owner: list[str]) -> None:
    state["sb:grow"] = json.dumps({"tree": tree.to_dict(), "owner": owner})


def start_tree(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Active party: start tree ``tree`` (the next one, never again): its gradients and hessians; for a tree
    that uses the passive parties' columns, encrypted and sealed to each of them with the root's rows; an
    ``active_trees`` tree is grown here alone (``done``)."""
    _role(env, "active", "starts a tree")
    t = int(payload["tree"])
    if t != int(state.get("sb:tree", -1)) + 1:
        raise StepError(f"party {env.name}: tree {t} does not follow tree {state.get('sb:tree')}")
    if "sb:grow" in state:
        raise StepError(f"party {env.name}: tree {state['sb:tree']} is not finished")
    state["sb:tree"] = t
    y, margins = _labels(env, state), get_array(state, "sb:margins")
    g, h = gradients("binary", y, margins[:, None], BITS)
    gq, hq = np.rint(g[:, 0] * SCALE).astype(np.int64), np.rint(h[:, 0] * SCALE).astype(np.int64)
    put_array(state, "sb:g", gq)
    put_array(state, "sb:h", hq)
    rule = _rule(env)
    tree = Tree()
    tree.value[0] = tree.threshold[0] = rule.weight(gq.sum() / SCALE, hq.sum() / SCALE)
    tree.cover[0] = hq.sum() / SCALE if env.cfg.boost.keep_hessians else 0.0
    _keep_grow(state, tree, [""])
    put_array(state, "sb:where", np.zeros(len(y), dtype=np.int32))
    state["sb:open"] = "[0]"
    state["sb:depth"] = 0
    if t <= env.cfg.boost.active_trees:
        for depth in range(env.cfg.boost.max_depth):
            _decide(state, env, t, depth, {})
            if _route(state, env, {}):
                return {"done": True}
        raise AssertionError("a tree grew past max_depth")
    private = _private(state)
    n = int(private.public_key.n)
    cts = pr.encrypt_packed(private, pack_fields(gq, hq), env.cfg.workers, env.cfg.boost.obfuscators)
    blob = pr.to_bytes(cts, n)
    out: dict[str, Any] = {}
    for p in peers(state):
        out[f"gh:{p}"] = seal_to(state, env, p, blob, f"sb-gh|{t}")
        out[f"nodes:{p}"] = seal_to(state, env, p, _nodes_blob(state, t, 0), f"sb-nodes|{t}|0")
    return out


def _nodes_blob(state: dict[str, Any], t: int, depth: int) -> bytes:
    """The rows' nodes for the passive parties: the open node of each aligned row, -1 for a row in a leaf."""
    open_nodes = json.loads(str(state["sb:open"]))
    where = get_array(state, "sb:where")
    shown = np.where(np.isin(where, open_nodes), where, -1).astype("<i4")
    return _blob({"tree": t, "depth": depth, "open": open_nodes}, shown.tobytes())


def histograms(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Passive party: the encrypted histograms of the open nodes of (tree, depth), once, levels only moving
    forward; sealed to the active party."""
    _role(env, "passive", "sends histograms")
    t, d, active = int(payload["tree"]), int(payload["depth"]), str(payload["active"])
    last = [int(v) for v in str(state.get("sb:at", "0|-1")).split("|")]
    if (t, d) <= (last[0], last[1]) or (d > 0 and t != last[0]) or (d > 0 and d != last[1] + 1):
        raise StepError(f"party {env.name}: level ({t}, {d}) does not follow level ({last[0]}, {last[1]})")
    modulus = int(open_from(state, env, active, payload["n"], "sb-n").decode(), 16)
    if state.get("sb:n") not in (None, hex(modulus)):
        raise StepError(f"party {env.name}: party {active}'s Paillier key changed within the run")
    state["sb:n"] = hex(modulus)
    header, body = _unblob(open_from(state, env, active, payload["nodes"], f"sb-nodes|{t}|{d}"), "node list")
    _at(header, t, d, "a node list")
    bins = get_array(state, "sb:bins").astype(np.int64)
    where = np.frombuffer(body, dtype="<i4").astype(np.int64)
    if where.shape[0] != bins.shape[0]:
        raise StepError(f"party {env.name}: a node list of {where.shape[0]} rows for {bins.shape[0]} aligned rows")
    if d == 0:
        blob = open_from(state, env, active, payload["gh"], f"sb-gh|{t}")
        state["sb:gh"] = blob
    elif "sb:gh" not in state:
        raise StepError(f"party {env.name}: no gradients of tree {t}")
    cts = pr.from_bytes(bytes(state["sb:gh"]), modulus, "gradient ciphertexts")
    if len(cts) != bins.shape[0]:
        raise StepError(f"party {env.name}: {len(cts)} gradient ciphertexts for {bins.shape[0]} aligned rows")
    state["sb:at"] = f"{t}|{d}"
    open_nodes = [int(v) for v in header.get("open", [])]
    pos = np.full(max([*open_nodes, int(where.max(initial=0))]) + 1, -1, dtype=np.int64)
    pos[open_nodes] = np.arange(len(open_nodes))
    at = np.where(where >= 0, pos[np.maximum(where, 0)], -1)
    cuts = _cuts(state)
    width = max((len(c) + 2 for c in cuts), default=2)  # bins 0 (missing) .. len(cuts) + 1
    n2 = modulus * modulus
    siblings = _siblings(state, t, d, where, open_nodes, at)
    direct = at if not siblings else np.where(np.isin(at, [c for c, _, _ in siblings], invert=True), at, -1)
    keys = [np.where(direct >= 0, direct * width + bins[:, f], -1) for f in range(bins.shape[1])]
    workers = env.cfg.workers or os.cpu_count() or 1
    if workers > 1 and len(keys) > 1:
        parts = parallel_map(bin_products_job, [(n2, cts, k) for k in chunks(keys, workers)], workers)
        products = [d_ for part in parts for d_ in part]
    else:
        products = bin_products_job(n2, cts, keys)
    if siblings:  # the larger child's sums: its parent's over its sibling's (one inversion per bin, no row)
        parent = pr.from_bytes(bytes(state["sb:prev"]), modulus, "the parent level's sums")
        m2_ = gmpy2.mpz(n2)
        for child, sibling, p_pos in siblings:
            for f, prod in enumerate(products):
                for b in range(width):
                    whole = parent[(p_pos * len(products) + f) * width + b]
                    if whole == 1:
                        continue
                    part = prod.get(sibling * width + b)
                    prod[child * width + b] = whole if part is None else int(whole * gmpy2.invert(part, m2_) % m2_)
    state["sb:prev"] = pr.to_bytes([prod.get(i * width + b, 1) for i in range(len(open_nodes)) for prod in products
                                    for b in range(width)], modulus)
    state["sb:prev_at"] = json.dumps({"tree": t, "depth": d, "open": open_nodes})
    k = env.cfg.boost.min_bin_rows
    layout: list[list[list[int]]] = []
    per = per_ciphertext(modulus.bit_length())
    m2 = gmpy2.mpz(n2)
    groups_of: list[list[int]] = []
    for i in range(len(open_nodes)):
        node_layout, node_cts = [], []
        for f, c in enumerate(cuts):
            counts = np.bincount(bins[at == i, f], minlength=len(c) + 2)
            his = groups(counts[1:len(c) + 2], int(counts[0]), k)
            node_layout.append(his)
            lo = 1
            for hi in his:
                acc = gmpy2.mpz(1)
                for b in range(lo, hi + 1):
                    v = products[f].get(i * width + b)
                    if v is not None:
                        acc = acc * v % m2
                node_cts.append(int(acc))
                lo = hi + 1
        layout.append(node_layout)
        groups_of.append(node_cts)
    # many group sums to a ciphertext (the shifts are the costly part: spread over the workers, node by node)
    if workers > 1 and len(groups_of) > 1:
        packed = [c for part in parallel_map(pack_job, [(n2, g, per) for g in groups_of], workers) for c in part]
    else:
        packed = [c for g in groups_of for c in pack_job(n2, g, per)]
    state["sb:layout"] = json.dumps({"tree": t, "depth": d, "open": open_nodes, "groups": layout})
    put_array(state, "sb:level_where", where.astype(np.int32))
    blob = _blob({"tree": t, "depth": d, "groups": [[len(g) for g in node] for node in layout]},
                 pr.to_bytes(packed, modulus))
    return {"sealed": seal_to(state, env, active, blob, f"sb-hist|{t}|{d}")}


def _siblings(state: dict[str, Any], t: int, d: int, where: np.ndarray, open_nodes: list[int],
              at: np.ndarray) -> list[tuple[int, int, int]]:
    """Open nodes whose sums follow from the level above (histogram subtraction): (the larger child, its smaller
    sibling, their parent's position in the level above), for pairs of children of one parent. Only the smaller
    children's rows are summed; a child's parent is the node its rows were in one level up."""
    held = json.loads(str(state.get("sb:prev_at", "null")))
    if d == 0 or not isinstance(held, dict) or (held.get("tree"), held.get("depth")) != (t, d - 1):
        return []
    before = get_array(state, "sb:level_where").astype(np.int64)
    up = {n: i for i, n in enumerate(held["open"])}
    by_parent: dict[int, list[int]] = {}
    for i in range(len(open_nodes)):
        came = np.unique(before[at == i])
        if came.size != 1 or int(came[0]) not in up:
            return []  # not a clean split of an open node of the level above: every sum from rows
        by_parent.setdefault(up[int(came[0])], []).append(i)
    out = []
    for p_pos, kids in by_parent.items():
        if len(kids) == 2:
            small, large = sorted(kids, key=lambda i: (int(np.sum(at == i)), i))
            out.append((large, small, p_pos))
    return out


def split(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Active party: decrypt the passive parties' histograms of this level (sealed to it for this level, once),
    decide every open node; a split on a passive party's column is asked of it (sealed)."""
    _role(env, "active", "decides splits")
    t, d = int(payload["tree"]), int(payload["depth"])
    if "sb:grow" not in state or (t, d) != (int(state["sb:tree"]), int(state["sb:depth"])):
        raise StepError(f"party {env.name}: level ({t}, {d}) is not the level under way")
    partners = peers(state)
    sealed = {p: open_from(state, env, p, payload[f"hist:{p}"], f"sb-hist|{t}|{d}") for p in partners
              if f"hist:{p}" in payload}
    if sorted(sealed) != partners:
        raise StepError(f"party {env.name}: histograms from {sorted(sealed)}, expected every passive party {partners}")
    once(state, env, f"sb.split {t}|{d}")
    return _decide(state, env, t, d, sealed)


def _decide(state: dict[str, Any], env: PartyEnv, t: int, d: int, sealed: dict[str, bytes]) -> dict[str, Any]:
    open_nodes = [int(v) for v in json.loads(str(state["sb:open"]))]
    private = _private(state)
    n = int(private.public_key.n)
    # the passive parties' group sums, decrypted: per party, per node, per feature, a list of (G, H)
    theirs: dict[str, list[list[list[tuple[int, int]]]]] = {}
    for p, data in sealed.items():
        header, body = _unblob(data, f"histogram of party {p}")
        _at(header, t, d, f"party {p}'s histogram")
        layout = header.get("groups")
        if not isinstance(layout, list) or len(layout) != len(open_nodes) or \
                any(not isinstance(node, list) or any(not isinstance(k, int) or k < 0 for k in node) for node in layout):
            raise StepError(f"party {p}'s histogram layout does not list its groups for {len(open_nodes)} open nodes")
        per = per_ciphertext(n.bit_length())
        cts = pr.from_bytes(body, n, f"histogram of party {p}")
        if len(cts) != sum(-(-sum(node) // per) for node in layout):
            raise StepError(f"party {p}'s histogram has {len(cts)} ciphertexts for its layout")
        workers = env.cfg.workers or os.cpu_count() or 1
        plain = [v for part in parallel_map(decrypt_job, [(private.p, private.q, n, c) for c in chunks(cts, workers)],
                                            workers) for v in part] if workers > 1 and len(cts) > 1 else \
            decrypt_job(private.p, private.q, n, cts)
        nodes_out, k = [], 0
        for node in layout:
            total = sum(node)
            fields: list[int] = []
            while len(fields) < 2 * total:
                count = min(per, total - len(fields) // 2)
                fields += unpack_fields(pr.signed(plain[k], n), 2 * count)
                k += 1
            pairs = list(zip(fields[0::2], fields[1::2]))
            feats, s = [], 0
            for count in node:
                feats.append(pairs[s:s + count])
                s += count
            nodes_out.append(feats)
        theirs[p] = nodes_out
    gq, hq = get_array(state, "sb:g"), get_array(state, "sb:h")
    bins = get_array(state, "sb:bins").astype(np.int64)
    where = get_array(state, "sb:where").astype(np.int64)
    cuts = _cuts(state)
    tree, owner = _grow(state)
    rule, b = _rule(env), env.cfg.boost
    keep = b.keep_hessians
    asks: dict[str, list[list[Any]]] = {}
    pending: dict[str, list[list[int]]] = {}
    for i, node in enumerate(open_nodes):
        sel = where == node
        G, H = int(gq[sel].sum()), int(hq[sel].sum())
        columns: list[tuple[np.ndarray, np.ndarray]] = []
        for f, c in enumerate(cuts):  # its own columns, in the clear
            columns.append((np.bincount(bins[sel, f], weights=gq[sel], minlength=len(c) + 2),
                            np.bincount(bins[sel, f], weights=hq[sel], minlength=len(c) + 2)))
        where_from: list[tuple[str, int]] = [("", f) for f in range(len(cuts))]
        for p in sorted(theirs):
            for f, pairs in enumerate(theirs[p][i]):
                gs, hs = np.array([a for a, _ in pairs], dtype=np.float64), np.array([h_ for _, h_ in pairs], dtype=np.float64)
                if pairs and (hs.min() < 0 or hs.sum() > H):
                    raise StepError(f"party {p}'s histogram of node {node}, its feature {f}, is not one of this node's "
                                    "rows (hessian sums out of range)")
                columns.append((np.concatenate([[G - gs.sum()], gs]), np.concatenate([[H - hs.sum()], hs])))
                where_from.append((p, f))
        width = max((len(col[0]) for col in columns), default=1)
        gh = np.zeros((len(columns), width))
        hh = np.zeros((len(columns), width))
        for f, (gc, hc) in enumerate(columns):
            gh[f, :len(gc)], hh[f, :len(hc)] = gc / SCALE, hc / SCALE
        counts = [max(len(col[0]) - 2, 0) for col in columns]
        f, j, dl, gain, _, v_l, v_r, _, h_l, h_r = decide_node(gh, hh, counts, np.arange(len(columns)), rule, keep)
        if f < 0:
            continue
        who, local = where_from[int(f)]
        threshold = float(cuts[local][int(j) - 1]) if not who else 0.0
        left, right = tree.add_children(node, local if not who else 0, int(j) if not who else -1, threshold, bool(dl),
                                        float(gain), (float(v_l), float(v_r)), (float(h_l), float(h_r)))
        owner += ["", ""]
        if who:
            owner[node] = who
            asks.setdefault(who, []).append([node, local, int(j), bool(dl)])
            pending.setdefault(who, []).append([node, left, right])
        else:
            bin_ = bins[sel, local]
            goes_left = np.where(bin_ == 0, bool(dl), bin_ <= int(j))
            idx = np.flatnonzero(sel)
            where[idx[goes_left]] = left
            where[idx[~goes_left]] = right
    _keep_grow(state, tree, owner)
    put_array(state, "sb:where", where.astype(np.int32))
    state["sb:pending"] = json.dumps(pending)
    return {f"ask:{p}": seal_to(state, env, p, json.dumps({"tree": t, "depth": d, "asks": a}).encode(), f"sb-ask|{t}|{d}")
            for p, a in asks.items()}


def apply(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Passive party: the splits the active party chose on its columns at this level (once): each threshold kept
    here under a new split id; which of the node's rows go left, sealed to the active party."""
    _role(env, "passive", "applies its own splits")
    t, d, active = int(payload["tree"]), int(payload["depth"]), str(payload["active"])
    if f"{t}|{d}" != str(state.get("sb:at")) or "sb:layout" not in state:
        raise StepError(f"party {env.name}: level ({t}, {d}) is not the level it sent histograms for")
    req = json.loads(open_from(state, env, active, payload["ask"], f"sb-ask|{t}|{d}"))
    once(state, env, f"sb.apply {t}|{d}")
    if req.get("tree") != t or req.get("depth") != d or not isinstance(req.get("asks"), list):
        raise StepError(f"party {env.name}: a split request that is not of level ({t}, {d})")
    layout = json.loads(str(state["sb:layout"]))
    open_nodes = layout["open"]
    cuts, bins = _cuts(state), get_array(state, "sb:bins").astype(np.int64)
    where = get_array(state, "sb:level_where").astype(np.int64)
    splits = json.loads(str(state["sb:splits"]))
    out, seen = [], set()
    for item in req["asks"]:
        if not isinstance(item, list) or len(item) != 4:
            raise StepError(f"party {env.name}: a malformed split request")
        node, f, j, dl = int(item[0]), int(item[1]), int(item[2]), bool(item[3])
        if node not in open_nodes or node in seen or not 0 <= f < len(cuts):
            raise StepError(f"party {env.name}: a split request for node {node}, feature {f}: not an open node of "
                            "this level, or twice, or no such feature")
        seen.add(node)
        his = layout["groups"][open_nodes.index(node)][f]
        if not 1 <= j < len(his):
            raise StepError(f"party {env.name}: a split request after group {j} of a feature it sent {len(his)} groups of")
        b = int(his[j - 1])
        splits.append({"feature": f, "bin": b, "threshold": float(cuts[f][b - 1]), "default_left": dl})
        col = bins[where == node, f]
        left = np.where(col == 0, dl, col <= b)
        out.append([node, len(splits) - 1, int(left.size), np.packbits(left.astype(np.uint8)).tobytes().hex()])
    state["sb:splits"] = json.dumps(splits)
    return {"sealed": seal_to(state, env, active, json.dumps({"tree": t, "depth": d, "applied": out}).encode(),
                            f"sb-apply|{t}|{d}")}


def route(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Active party: move the rows of the passive parties' splits to their children (from their sealed answers,
    once); the next level's open nodes to each passive party, or the tree's end (``done``)."""
    _role(env, "active", "routes rows")
    t, d = int(payload["tree"]), int(payload["depth"])
    if "sb:grow" not in state or (t, d) != (int(state["sb:tree"]), int(state["sb:depth"])):
        raise StepError(f"party {env.name}: level ({t}, {d}) is not the level under way")
    once(state, env, f"sb.route {t}|{d}")
    answers = {p: open_from(state, env, p, payload[f"apply:{p}"], f"sb-apply|{t}|{d}")
               for p in json.loads(str(state.get("sb:pending", "{}")))}
    if _route(state, env, answers):
        return {"done": True}
    return {f"nodes:{p}": seal_to(state, env, p, _nodes_blob(state, t, d + 1), f"sb-nodes|{t}|{d + 1}")
            for p in peers(state)}


def _route(state: dict[str, Any], env: PartyEnv, answers: dict[str, bytes]) -> bool:
    """Apply the passive parties' answers of this level; open the next level, or end the tree (True)."""
    t, d = int(state["sb:tree"]), int(state["sb:depth"])
    pending = json.loads(str(state.get("sb:pending", "{}")))
    tree, owner = _grow(state)
    where = get_array(state, "sb:where").astype(np.int64)
    for p, data in answers.items():
        got = json.loads(data)
        want = {int(node): (int(lc), int(rc)) for node, lc, rc in pending[p]}
        if got.get("tree") != t or got.get("depth") != d or sorted(int(a[0]) for a in got.get("applied", [])) != sorted(want):
            raise StepError(f"party {p}'s answer does not cover the splits it was asked at level ({t}, {d})")
        for node, sid, size, bits in got["applied"]:
            idx = np.flatnonzero(where == int(node))
            left = np.unpackbits(np.frombuffer(bytes.fromhex(bits), dtype=np.uint8), count=int(size)).astype(bool) \
                if size else np.zeros(0, dtype=bool)
            if left.size != idx.size:
                raise StepError(f"party {p} routed {left.size} rows of node {node}, which holds {idx.size}")
            lc, rc = want[int(node)]
            where[idx[left]], where[idx[~left]] = lc, rc
            tree.split_bin[int(node)] = int(sid)
    state.pop("sb:pending", None)
    open_nodes = [n for n in json.loads(str(state["sb:open"])) if tree.left[n] >= 0]
    nxt = [c for n in open_nodes for c in (tree.left[n], tree.right[n])] if d + 1 < env.cfg.boost.max_depth else []
    _keep_grow(state, tree, owner)
    put_array(state, "sb:where", where.astype(np.int32))
    if nxt:
        state["sb:open"], state["sb:depth"] = json.dumps(nxt), d + 1
        return False
    margins = get_array(state, "sb:margins") + np.asarray(tree.value)[where]
    put_array(state, "sb:margins", margins)
    trees = json.loads(str(state["sb:trees"]))
    trees.append({"tree": tree.to_dict(), "owner": owner})
    state["sb:trees"] = json.dumps(trees)
    for key in ("sb:grow", "sb:open", "sb:where", "sb:g", "sb:h", "sb:depth"):
        state.pop(key, None)
    return True


# ---- scoring ------------------------------------------------------------------------------------------
def partial(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Passive party: for each of its split ids, which aligned ``which`` rows go left (sealed to the active
    party); held-out rows once per tree, rows to score once."""
    _role(env, "passive", "routes its splits")
    which, active = str(payload["which"]), str(payload["active"])
    if which == "test":  # after each tree of the run at most (its own config's count)
        count = int(state.get("sb:tests", 0)) + 1
        if count > env.cfg.epochs:
            raise StepError(f"party {env.name} has routed its held-out rows after each of the run's {env.cfg.epochs} "
                            "trees already")
        state["sb:tests"] = count
    else:
        once(state, env, f"sb.partial {which}")
    x = as_float32(env.table(which).x[rows(state, which)]).astype(np.float32)
    splits = json.loads(str(state.get("sb:splits", "[]")))
    bits = []
    for s in splits:
        col = x[:, int(s["feature"])]
        left = np.where(np.isnan(col), bool(s["default_left"]), col < np.float32(s["threshold"]))
        bits.append(np.packbits(left.astype(np.uint8)).tobytes())
    blob = _blob({"splits": len(splits), "rows": int(x.shape[0])}, b"".join(bits))
    return {"sealed": seal_to(state, env, active, blob, f"sb-score-{which}")}


def walk(parts: list[dict[str, Any]], x: np.ndarray, bits: dict[str, np.ndarray], base: float) -> np.ndarray:
    """The margins of rows ``x`` (the active party's columns) under the trees ``parts``; ``bits[p][s]``: whether
    each row goes left at passive party p's split s."""
    x32 = as_float32(x).astype(np.float32)
    margins = np.full(x.shape[0], base)
    r = np.arange(x.shape[0])
    for part in parts:
        t, owner = Tree.from_dict(part["tree"]), part["owner"]
        node = np.zeros(x.shape[0], dtype=np.int64)
        thr = np.asarray(t.threshold, dtype=np.float32)
        for _ in range(max(t.depth) + 1):
            inner = np.asarray(t.left)[node] >= 0
            if not inner.any():
                break
            go = np.zeros(x.shape[0], dtype=bool)
            for n in np.unique(node[inner]).tolist():
                at = r[node == n]
                if owner[n]:
                    go[at] = bits[owner[n]][t.split_bin[n]][at]
                else:
                    v = x32[at, t.feature[n]]
                    go[at] = np.where(np.isnan(v), t.default_left[n], v < thr[n])
            node = np.where(inner, np.where(go, np.asarray(t.left)[node], np.asarray(t.right)[node]), node)
        margins += np.asarray(t.value)[node]
    return margins


def score(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Active party: the scores of the aligned ``which`` rows from its trees and the passive parties' routes."""
    _role(env, "active", "scores")
    which = str(payload["which"])
    x = env.table(which).x[rows(state, which)]
    bits: dict[str, np.ndarray] = {}
    for p in str(payload["peers"]).split(","):
        header, body = _unblob(open_from(state, env, p, payload[f"sealed:{p}"], f"sb-score-{which}"), f"routes of {p}")
        count, n = int(header.get("splits", -1)), int(header.get("rows", -1))
        size = (n + 7) // 8
        if n != x.shape[0] or count < 0 or len(body) != count * size:
            raise StepError(f"party {p} sent routes of {n} rows ({len(body)} bytes) for {x.shape[0]} aligned rows")
        raw = np.frombuffer(body, dtype=np.uint8).reshape(count, size) if count else np.zeros((0, size), np.uint8)
        bits[p] = np.unpackbits(raw, axis=1, count=n).astype(bool) if count else np.zeros((0, n), dtype=bool)
    parts = json.loads(str(state["sb:trees"]))
    for part in parts:
        for n, who in enumerate(part["owner"]):
            if who and not 0 <= part["tree"]["split_bin"][n] < len(bits.get(who, [])):
                raise StepError(f"party {who} sent no route for its split {part['tree']['split_bin'][n]}")
    m = walk(parts, x, bits, float(state["sb:base"]))
    return finish_scores(env, state, which, 1 / (1 + np.exp(-m)), payload)


def save(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Write this party's part of the model: the active party's trees and base margin, a passive party's split
    table (feature, threshold, default direction by split id)."""
    if env.role == "active":
        body = {"base": float(state["sb:base"]), "trees": json.loads(str(state["sb:trees"]))}
    else:
        body = {"splits": json.loads(str(state.get("sb:splits", "[]")))}
    return write_part(env, MODEL, {"model": np.frombuffer(json.dumps(body).encode(), dtype=np.uint8)},
                      trees=len(body.get("trees", [])), splits=len(body.get("splits", [])))


def load(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """A scoring run: this party's saved part of the model."""
    meta, arrays = read_part(env, MODEL)
    body = json.loads(bytes(arrays["model"]).decode())
    if env.role == "active":
        state["sb:base"], state["sb:trees"] = float(body["base"]), json.dumps(body["trees"])
    else:
        state["sb:splits"] = json.dumps(body["splits"])
    return {"model": MODEL, "run": str(meta.get("run", ""))}


register({"sb.setup": setup, "sb.tree": start_tree, "sb.hist": histograms, "sb.split": split, "sb.apply": apply,
          "sb.route": route, "sb.partial": partial, "sb.score": score, "sb.save": save, "sb.load": load})


# ---- coordinator half -----------------------------------------------------------------------------------
def _setup(s: Session) -> None:
    s.keys = s.send("sb.setup", {p: {} for p in s.parties}, "setup")  # the active party's modulus, sealed to each


def _step(s: Session, epoch: int, batch: int, pending: dict[str, Any] | None) -> None:
    """One tree (module docstring): the coordinator relays sealed bytes between the parties."""
    a, led = s.active, s.ledger
    r = s.send("sb.tree", {a: {"tree": epoch}}, "encrypt")[a]
    depth = 0
    while not r.get("done"):
        hist: dict[str, dict[str, Any]] = {}
        for p in s.passive:
            hist[p] = {"tree": epoch, "depth": depth, "active": a, "n": led.relay(a, p, s.keys[a][f"n:{p}"]),
                       "nodes": led.relay(a, p, r[f"nodes:{p}"])}
            if depth == 0:
                hist[p]["gh"] = led.relay(a, p, r[f"gh:{p}"])
        h = s.send("sb.hist", hist, "histograms")
        sp = s.send("sb.split", {a: {"tree": epoch, "depth": depth,
                                     **{f"hist:{p}": led.relay(p, a, h[p]["sealed"]) for p in s.passive}}}, "split")[a]
        asked = [p for p in s.passive if f"ask:{p}" in sp]
        applied = s.send("sb.apply", {p: {"tree": epoch, "depth": depth, "active": a,
                                          "ask": led.relay(a, p, sp[f"ask:{p}"])} for p in asked}, "apply") if asked else {}
        r = s.send("sb.route", {a: {"tree": epoch, "depth": depth,
                                    **{f"apply:{p}": led.relay(p, a, applied[p]["sealed"]) for p in asked}}}, "route")[a]
        depth += 1


def _finish_epoch(s: Session, pending: dict[str, Any] | None) -> None:
    return None


def _score(s: Session, which: str, write: bool) -> dict[str, Any]:
    return batch_score(s, "sb", which, write)


def trainer() -> Trainer:
    """The SecureBoost trainer's steps (one tree per ``vertical.epochs``)."""
    return Trainer(_setup, _step, _finish_epoch, _score, "sb")
