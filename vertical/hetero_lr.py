"""Hetero logistic regression with Paillier (Hardy et al. 2017), every party holding its own key.

The model is ``sigmoid(u)``, ``u = sum_p X_p w_p`` (the active party's part has the bias). The
gradient uses the second-order Taylor expansion of the logistic loss around 0 (Hardy et al.,
FATE's hetero LR): the residual of a row is ``r = 0.5 + u/4 - y``, the active party's share is
``d_A = 0.5 + u_A/4 - y`` and each passive party's ``u_p/4``; party ``p``'s gradient is
``X_p^T r / |batch| + l2 * w_p``.

One step, for an active party A and passive parties B1..Bk (coordinator: :func:`run_step`):

1. *encrypt*: A packs and encrypts ``d_A`` under its own key; B1 encrypts ``u_1/4`` under its own
   key; the others keep their share. (Rows packed many per ciphertext: :mod:`vertical.paillier_rows`.)
2. *add* (k > 1): each passive party in turn adds its share to both running ciphertexts.
3. *gradient*: every passive party computes ``Enc_A(X_p^T r)`` from A's running ciphertext, A
   computes ``Enc_B1(X_A^T r)`` from B1's; each adds a fresh random mask.
4. *decrypt*: A decrypts the passive parties' masked gradients, B1 decrypts A's.
5. *update* (with the next step's *encrypt*): each party removes its mask and updates its weights.

Who sees what: a key owner decrypts only masked values (statistically hiding, 40 bits); the
parties exchange ciphertexts under a key they do not hold; the coordinator relays ciphertexts and
masked values and holds no key. Each party learns its own gradient, which it needs to update
(the same leakage as Hardy et al.'s protocol). Scoring (after each epoch on held-out customers,
and in a scoring run) sends each passive party's partial scores sealed to the active party, who
learns them (it could compute them from the final score and its own part anyway).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from phe import paillier

from vertical import paillier_rows as pr
from vertical.coordinator import Session, Trainer, batch_score
from vertical.party import (
    PartyEnv,
    StepError,
    batch_rows,
    finish_scores,
    get_array,
    get_ints,
    once,
    open_from,
    peer_channel,
    peers,
    put_array,
    put_ints,
    read_part,
    register,
    rows,
    seal_to,
    write_part,
)


def codec(env: PartyEnv, parties: int) -> pr.RowCodec:
    """The packing every party uses (the residual's bound is split among the parties' shares)."""
    return pr.RowCodec(key_bits=env.cfg.key_bits)


def share_clip(c: pr.RowCodec, parties: int) -> float:
    """Each party's share of the clip of the summed partial scores."""
    return c.d_clip / parties


def features(env: PartyEnv, which: str, state: dict[str, Any], idx: np.ndarray | None = None) -> np.ndarray:
    """The party's model inputs of the aligned rows, or of batch ``idx`` of them (the active
    party's with a bias column)."""
    r = rows(state, which)
    x = env.table(which).x[r if idx is None else r[idx]]
    return np.column_stack([x, np.ones(len(x))]) if env.role == "active" else x


def _private(state: dict[str, Any]) -> paillier.PaillierPrivateKey:
    p, q = get_ints(state, "lr:pq")
    public = paillier.PaillierPublicKey(p * q)
    return paillier.PaillierPrivateKey(public, p, q)


def _public(state: dict[str, Any], peer: str) -> paillier.PaillierPublicKey:
    return paillier.PaillierPublicKey(get_ints(state, f"lr:n:{peer}")[0])



def _step_of(state: dict[str, Any], env: PartyEnv) -> str:
    if "lr:step" not in state:
        raise StepError(f"party {env.name}: no training step is under way (lr.encrypt starts one)")
    return str(state["lr:step"])



def keys(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Make this party's Paillier key pair for the run, once; send the modulus sealed to each peer; start the weights."""
    once(state, env, "lr.keys")
    public, private = paillier.generate_paillier_keypair(n_length=env.cfg.key_bits)
    put_ints(state, "lr:pq", [int(private.p), int(private.q)])
    width = len(env.table("train").features) + (1 if env.role == "active" else 0)
    put_array(state, "lr:w", np.zeros(width))
    state["lr:parties"] = int(payload["parties"])
    return {f"n:{p}": seal_to(state, env, p, hex(public.n).encode(), "lr-n") for p in peers(state)}


def _update(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> None:
    """Open the decrypted gradient its key owner sealed to this party for the last step, remove the
    mask and take the step (once: the masks are used up)."""
    if "update" not in payload:
        return
    step = _step_of(state, env)
    if "lr:masks" not in state:
        raise StepError(f"party {env.name}: no masked gradient of step {step} awaits its update (applied already?)")
    c = codec(env, int(state["lr:parties"]))
    text = open_from(state, env, str(payload["update_from"]), payload["update"], f"lr-plain|{step}").decode()
    try:
        values = [int(v, 16) for v in text.split(",")]
    except ValueError:
        raise StepError(f"party {env.name}: the decrypted gradient is not a list of hexadecimal integers") from None
    masks = get_ints(state, "lr:masks")
    if len(values) != len(masks):
        raise StepError(f"party {env.name}: {len(values)} decrypted values for {len(masks)} masked ones")
    grad = pr.unmask(values, masks, get_ints(state, "lr:mask_n")[0], c) / int(state["lr:batch_rows"])
    w = get_array(state, "lr:w")
    penalty = env.cfg.l2 * w
    if env.role == "active":
        penalty[-1] = 0.0  # no penalty on the bias
    put_array(state, "lr:w", w - env.cfg.lr * (grad + penalty))
    del state["lr:masks"]


def encrypt(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Apply the last step's gradient, then start step (epoch, batch): this party's share,
    encrypted (A, B1) and sealed to the party the coordinator names, or kept (others). Steps only
    move forward: a step is never started twice."""
    for k, v in payload.items():
        if k.startswith("n:"):
            modulus = open_from(state, env, k[2:], v, "lr-n").decode()
            held = state.get(f"lr:n:{k[2:]}")
            put_ints(state, f"lr:{k}", [int(modulus, 16)])
            if held is not None and state[f"lr:{k}"] != held:
                raise StepError(f"party {env.name}: party {k[2:]}'s Paillier key changed within the run")
    _update(payload, state, env)
    if payload.get("only_update"):
        return {}
    epoch, batch = int(payload["epoch"]), int(payload["batch"])
    last = [int(v) for v in str(state.get("lr:step", "0|-1")).split("|")]
    if (epoch, batch) <= (last[0], last[1]):
        raise StepError(f"party {env.name}: step ({epoch}, {batch}) does not follow step ({last[0]}, {last[1]})")
    if "lr:masks" in state:
        raise StepError(f"party {env.name}: step ({last[0]}, {last[1]})'s gradient was never applied")
    state["lr:step"] = f"{epoch}|{batch}"
    n = len(rows(state, "train"))
    idx = batch_rows(env, n, epoch, batch)
    parties = int(state["lr:parties"])
    c = codec(env, parties)
    x = features(env, "train", state, idx)
    u = x @ get_array(state, "lr:w")
    clip = share_clip(c, parties)
    if env.role == "active":
        y = env.table("train").y
        assert y is not None
        share = np.clip(0.5 + u / 4 - y[rows(state, "train")][idx], -clip, clip)
    else:
        share = np.clip(u / 4, -clip, clip)
    q = c.quantise_d(share)
    put_array(state, "lr:share", q)
    put_array(state, "lr:idx", idx)
    state["lr:batch_rows"] = len(idx)
    if not payload.get("encrypt"):
        return {}
    cts = pr.encrypt_packed(_private(state), c.pack_rows(q), env.cfg.workers)
    label = f"lr-{'d' if env.role == 'active' else 'v'}|{epoch}|{batch}"
    return {"sealed": seal_to(state, env, payload["to"], pr.to_bytes(cts, int(_private(state).public_key.n)), label)}


def _running(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv, key: str) -> bytes:
    """The running ciphertexts ``key`` (d or v) of this step, opened from the party that sealed them."""
    return open_from(state, env, str(payload[f"{key}_from"]), payload[key], f"lr-{key}|{_step_of(state, env)}")


def add(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Passive party in the chain: add its share to the running ciphertexts it is given, once per
    step, and seal them on (to ``to``, or to each of ``to_d`` / ``to_v`` after the gradient)."""
    return _add(payload, state, env)[1]


def _add(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> tuple[dict[str, bytes], dict[str, Any]]:
    if env.role != "passive":
        raise StepError(f"party {env.name} is {env.role}; only passive parties add their shares")
    step = _step_of(state, env)
    once(state, env, f"lr.add {step}")
    c = codec(env, int(state["lr:parties"]))
    packed = c.pack_rows(get_array(state, "lr:share"))
    out: dict[str, Any] = {}
    for key, owner in (("d", str(payload["active"])), ("v", str(payload.get("first", "")))):
        if key in payload:
            pub = _public(state, owner)
            cts = pr.from_bytes(_running(payload, state, env, key), int(pub.n), f"running {key} ciphertexts")
            out[key] = pr.to_bytes(pr.add_plain(pub, cts, packed), int(pub.n))
    sealed: dict[str, Any] = {}
    for key, blob in out.items():
        targets = str(payload.get(f"to_{key}", payload.get("to", ""))).split(",")
        for to in filter(None, targets):
            sealed[f"{key}:{to}"] = seal_to(state, env, to, blob, f"lr-{key}|{step}")
    return out, sealed


def gradient(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """``Enc(X^T r) + mask`` under the key of the party whose ciphertext this party received,
    sealed to that key's owner for this step, once per step."""
    step = _step_of(state, env)
    plain, out = _add(payload, state, env) if payload.get("add") else ({}, {})
    once(state, env, f"lr.gradient {step}")
    owner = str(payload["owner"])
    key = "d" if env.role == "passive" else "v"
    blob = plain.get(key) or _running(payload, state, env, key)
    pub = _public(state, owner)
    cts = pr.from_bytes(bytes(blob), int(pub.n), "residual ciphertexts")
    c = codec(env, int(state["lr:parties"]))
    if env.role == "active":  # the passive shares' ciphertext plus this party's own share
        cts = pr.add_plain(pub, cts, c.pack_rows(get_array(state, "lr:share")))
    idx = get_array(state, "lr:idx")
    x = c.quantise_x(features(env, "train", state, idx))
    if len(cts) != c.ciphertexts(len(idx)):
        raise StepError(f"party {env.name}: {len(cts)} residual ciphertexts for a batch of {len(idx)} rows")
    masked, masks = pr.mask(pub, pr.inner_products(pub, cts, c.exponents(x), env.cfg.workers), c)
    put_ints(state, "lr:masks", masks)
    put_ints(state, "lr:mask_n", [int(pub.n)])
    out["masked"] = seal_to(state, env, owner, pr.to_bytes(masked, int(pub.n)), f"lr-masked|{step}")
    return out


def decrypt(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Key owner: decrypt the masked gradients its peers sealed to it for *this* step, once per
    step, and seal each result back to its peer. Nothing else is decrypted: a ciphertext that is not
    a peer's masked gradient of the current step does not open (:mod:`vertical.channel`)."""
    step = _step_of(state, env)
    peers = [k[7:] for k in payload if k.startswith("masked:")]
    if not peers:
        raise StepError(f"party {env.name}: nothing to decrypt")
    private = _private(state)
    opened = {p: open_from(state, env, p, payload[f"masked:{p}"], f"lr-masked|{step}") for p in peers}
    once(state, env, f"lr.decrypt {step}")
    out = {}
    for p, blob in opened.items():
        cts = pr.from_bytes(blob, int(private.public_key.n), f"masked gradient of {p}")
        text = ",".join(hex(m) for m in pr.decrypt(private, cts))
        out[f"plain:{p}"] = seal_to(state, env, p, text.encode(), f"lr-plain|{step}")
    return out


def partial(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Passive party: its partial scores of the aligned ``which`` rows, sealed to the active party."""
    which = str(payload["which"])
    x = features(env, which, state)
    u = x @ get_array(state, "lr:w")
    ch = peer_channel(state, env, str(payload["active"]))
    return {"sealed": ch.seal(u.astype("<f8").tobytes(), f"scores-{which}")}


def score(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Active party: combine the partial scores; metrics if the rows have labels; scores kept here."""
    which = str(payload["which"])
    u = features(env, which, state) @ get_array(state, "lr:w")
    for p in str(payload["peers"]).split(","):
        ch = peer_channel(state, env, p)
        part = np.frombuffer(ch.open(bytes(payload[f"sealed:{p}"]), f"scores-{which}"), dtype="<f8")
        if part.shape != u.shape:
            raise StepError(f"party {p} sent {part.size} partial scores for {u.size} aligned rows")
        u = u + part
    return finish_scores(env, state, which, 1 / (1 + np.exp(-u)), payload)


def save(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Write this party's part of the model (its weights and preprocessing) where it keeps models."""
    return write_part(env, "hetero_lr", {"w": get_array(state, "lr:w")})


def load(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """A scoring run: this party's saved part of the model."""
    meta, arrays = read_part(env, "hetero_lr")
    put_array(state, "lr:w", arrays["w"])
    return {"model": "hetero_lr", "run": str(meta.get("run", ""))}


register({"lr.keys": keys, "lr.encrypt": encrypt, "lr.add": add, "lr.gradient": gradient,
          "lr.decrypt": decrypt, "lr.partial": partial, "lr.score": score, "lr.save": save, "lr.load": load})


# ---- coordinator half -------------------------------------------------------------------------
def _setup(s: Session) -> None:
    s.keys = s.send("lr.keys", {p: {"parties": len(s.parties)} for p in s.parties}, "keys")  # moduli sealed to each peer


def _step(s: Session, epoch: int, batch: int, pending: dict[str, Any] | None) -> dict[str, Any]:
    """One step of the protocol (module docstring). Every ciphertext and decrypted value travels sealed
    from party to party, bound to the step; the coordinator relays what it cannot open."""
    a, first, last = s.active, s.passive[0], s.passive[-1]
    led = s.ledger
    chain = len(s.passive) > 1
    enc: dict[str, dict[str, Any]] = {}
    for p in s.parties:
        enc[p] = {"epoch": epoch, "batch": batch, "encrypt": p in (a, first)}
        if p == a:
            enc[p]["to"] = first
        elif p == first:
            enc[p]["to"] = s.passive[1] if chain else a
        if pending is not None:
            enc[p].update(pending[p])
        if epoch == 1 and batch == 0:  # the peers' public keys, once
            enc[p].update({f"n:{q}": led.relay(q, p, s.keys[q][f"n:{p}"])
                           for q in ((first,) if p == a else (a, first)) if q != p})
    out = s.send("lr.encrypt", enc, "encrypt")
    d, v = out[a]["sealed"], out[first]["sealed"]
    d_from, v_from = a, first
    for i, p in enumerate(s.passive[:-1]):  # several passive parties: each adds its share in turn
        nxt = s.passive[i + 1]
        payload: dict[str, Any] = {"active": a, "d": led.relay(d_from, p, d), "d_from": d_from, "to": nxt}
        if i > 0:
            payload.update({"first": first, "v": led.relay(v_from, p, v), "v_from": v_from})
        r = s.send("lr.add", {p: payload}, "add")[p]
        d, d_from = r[f"d:{nxt}"], p
        if i > 0:
            v, v_from = r[f"v:{nxt}"], p
    grad: dict[str, dict[str, Any]] = {last: {"add": True, "owner": a, "active": a, "d": led.relay(d_from, last, d),
                                              "d_from": d_from}}
    if chain:
        grad[last].update({"first": first, "v": led.relay(v_from, last, v), "v_from": v_from,
                           "to_d": ",".join(s.passive[:-1]), "to_v": a})
    else:
        grad[a] = {"owner": first, "v": led.relay(first, a, v), "v_from": first}
    r = s.send("lr.gradient", grad, "gradient")
    masked = {last: r[last]["masked"]}
    if chain:
        more: dict[str, dict[str, Any]] = {p: {"owner": a, "d": led.relay(last, p, r[last][f"d:{p}"]), "d_from": last}
                                           for p in s.passive[:-1]}
        more[a] = {"owner": first, "v": led.relay(last, a, r[last][f"v:{a}"]), "v_from": last}
        r2 = s.send("lr.gradient", more, "gradient")
        masked.update({p: r2[p]["masked"] for p in s.passive[:-1]})
        a_masked = r2[a]["masked"]
    else:
        a_masked = r[a]["masked"]
    dec = s.send("lr.decrypt", {a: {f"masked:{p}": led.relay(p, a, masked[p]) for p in s.passive},
                                first: {f"masked:{a}": led.relay(a, first, a_masked)}}, "decrypt")
    nxt_updates = {p: {"update": led.relay(a, p, dec[a][f"plain:{p}"]), "update_from": a} for p in s.passive}
    nxt_updates[a] = {"update": led.relay(first, a, dec[first][f"plain:{a}"]), "update_from": first}
    return nxt_updates


def _finish_epoch(s: Session, pending: dict[str, Any] | None) -> None:
    if pending is not None:
        s.send("lr.encrypt", {p: {**pending[p], "only_update": True} for p in s.parties}, "update")


def _score(s: Session, which: str, write: bool) -> dict[str, Any]:
    return batch_score(s, "lr", which, write)


def trainer() -> Trainer:
    """The hetero-LR trainer's steps."""
    return Trainer(_setup, _step, _finish_epoch, _score, "lr")
