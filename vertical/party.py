"""The party half of every vertical protocol: one function per step, state kept between messages.

A party answers the coordinator's steps (:mod:`vertical.coordinator`) with :func:`handle`. Its
secrets (PSI scalar, channel key, Paillier key, masks) and its model part live in ``state``, a
flat dict of bytes, strings and numbers that the ClientApp keeps in Flower's ``context.state``
between messages (in a deployment every message starts a new process). Nothing in a reply is a
plaintext id, feature, label or individual score: blinded points, ciphertexts, masked values,
sealed bytes, counts and digests.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.metrics import binary_metrics
from vertical import channel, psi
from vertical.config import VerticalConfig
from vertical.data import PartyDataError, PartyTable, cached_party


class StepError(ValueError):
    """A step this party cannot take (wrong role, missing state, malformed payload)."""


@dataclass(frozen=True)
class PartyEnv:
    """Who this party is and where its files are (node config in a deployment, party config in simulation)."""

    name: str
    role: str
    data: str
    schema: str
    test: str | None
    score: str | None
    model_dir: str
    run: str
    seed: int
    cfg: VerticalConfig
    deployed: bool = False            # a SuperNode with its own files (not a simulated party)
    noise_secret: str | None = None   # split NN protection noise: the party's own secret seed
    identity: bytes | None = None     # its long-term Ed25519 identity (node config party-key)
    pinned: dict[str, bytes] | None = None   # the other parties' identities (node config peer-keys)

    def table(self, which: str) -> PartyTable:
        """The party's rows for ``which`` (train | test | score): test and score rows through the
        transform fitted on its training rows."""
        train = cached_party(self.name, self.role, self.data, self.schema)
        if which == "train":
            return train
        path = self.test if which == "test" else self.score
        if not path:
            raise PartyDataError(f"party {self.name} has no {which} file")
        if which == "score" and self.role == "active":
            try:  # rows to score may come without labels
                return cached_party(self.name, "active", path, self.schema, train)
            except PartyDataError as err:
                if "missing column" not in str(err):
                    raise
        return cached_party(self.name, "passive" if which == "score" else self.role, path, self.schema, train)


# ---- state helpers ------------------------------------------------------------------------------
def put_array(state: dict[str, Any], key: str, a: np.ndarray) -> None:
    """Keep array ``a`` in the party's state under ``key``."""
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    state[key] = buf.getvalue()


def get_array(state: dict[str, Any], key: str) -> np.ndarray:
    """The array kept under ``key``; StepError if the steps before did not keep it."""
    if key not in state:
        raise StepError(f"missing state {key!r}: the steps before this one did not run at this party")
    return np.load(io.BytesIO(bytes(state[key])), allow_pickle=False)


def put_ints(state: dict[str, Any], key: str, values: list[int]) -> None:
    """Keep the integers ``values`` in the party's state under ``key``."""
    state[key] = json.dumps([hex(v) for v in values])


def get_ints(state: dict[str, Any], key: str) -> list[int]:
    """The integers kept under ``key``; StepError if missing."""
    if key not in state:
        raise StepError(f"missing state {key!r}")
    return [int(v, 16) for v in json.loads(str(state[key]))]


def peer_channel(state: dict[str, Any], env: PartyEnv, peer: str) -> channel.Channel:
    """The sealed channel to ``peer`` (from the keys exchanged at setup); StepError without its key."""
    pub = state.get(f"pub:{peer}")
    if pub is None:
        raise StepError(f"party {env.name} has no channel key of party {peer}")
    return channel.Channel.between(bytes(state["chan"]), bytes(pub), env.name, peer, env.run)


def accept_peer_keys(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> None:
    """Keep the peers' run keys the coordinator relays (``pub:<peer>``), each only if signed by that
    peer's pinned identity (``sig:<peer>``); a deployed party without pinned identities refuses, and a
    key once accepted is never replaced in the run (:mod:`vertical.channel`)."""
    for k, v in payload.items():
        if not k.startswith("pub:"):
            continue
        peer, key = k[4:], bytes(v)
        if peer == env.name:
            raise StepError(f"party {env.name}: offered a run key in its own name")
        if env.pinned is not None:
            if peer not in env.pinned:
                raise StepError(f"party {env.name}: {peer!r} is not among the parties it pins (peer-keys)")
            channel.verify_run_key(env.pinned[peer], env.run, peer, key, bytes(payload.get(f"sig:{peer}", b"")))
        elif env.deployed:
            raise StepError(f"party {env.name} is deployed without pinned peer identities: start it with node config "
                            "party-key and peer-keys (fedsilo keys vertical), so that no coordinator can put its own "
                            "key between the parties")
        held = state.get(k)
        if held is not None and bytes(held) != key:
            raise StepError(f"party {env.name}: party {peer}'s run key changed within the run; refused")
        state[k] = key


def peers(state: dict[str, Any]) -> list[str]:
    """The parties whose run keys this party accepted (every other party of the run)."""
    return sorted(str(k)[4:] for k in state if str(k).startswith("pub:"))


def seal_to(state: dict[str, Any], env: PartyEnv, to: Any, data: bytes, label: str) -> bytes:
    """``data`` sealed to peer ``to`` under ``label`` (a step's object); StepError for a party it may not address."""
    to = str(to)
    if to == env.name or f"pub:{to}" not in state:
        raise StepError(f"party {env.name}: {to!r} is not a peer it may address")
    return peer_channel(state, env, to).seal(data, label)


def open_from(state: dict[str, Any], env: PartyEnv, peer: str, sealed: Any, label: str) -> bytes:
    """Open what ``peer`` sealed to this party under ``label`` (a step's object, bound to the step)."""
    try:
        return peer_channel(state, env, peer).open(bytes(sealed), label)
    except channel.ChannelError as err:
        raise StepError(str(err)) from None


def once(state: dict[str, Any], env: PartyEnv, what: str) -> None:
    """Refuse a protocol action this party takes once per run (``what`` names it)."""
    key = f"once:{what}"
    if state.get(key):
        raise StepError(f"party {env.name} has done {what} in this run already; it does not do it twice")
    state[key] = 1


def rows(state: dict[str, Any], which: str) -> np.ndarray:
    """The party's rows of the aligned ``which`` set (train or test), in the agreed order."""
    return get_array(state, f"rows:{which}")


def batch_rows(env: PartyEnv, n: int, epoch: int, batch: int) -> np.ndarray:
    """The aligned positions in batch ``batch`` of ``epoch`` (the same at every party)."""
    size = env.cfg.batch_size or n
    order = np.random.default_rng([env.seed, epoch]).permutation(n) if env.cfg.seed_batches else np.arange(n)
    return order[batch * size:(batch + 1) * size]


def finish_scores(env: PartyEnv, state: dict[str, Any], which: str, p: np.ndarray,
                  payload: dict[str, Any]) -> dict[str, Any]:
    """Write the scores at the active party (a scoring run) and return only aggregate metrics."""
    t = env.table(which)
    r = rows(state, which)
    out: dict[str, Any] = {"scored": int(len(r)), "rows": len(t)}
    if payload.get("write"):
        path = model_path(env).with_name(f"{env.name}.scores.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write("id,score\n")
            for i, s in zip(t.ids[r], p):
                f.write(f"{i},{s:.6f}\n")
        out["scores_file"] = str(path)
    if t.y is not None:
        y = t.y[r]
        eps = 1e-12
        loss = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))
        out.update({f"m:{k}": float(v) for k, v in binary_metrics(y.astype(np.int64), p, loss).items()})
    return out


# ---- hello and private set intersection ------------------------------------------------------
def hello(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Role, schema fingerprint, row counts: what the coordinator checks before anything else."""
    t = env.table("train")
    out: dict[str, Any] = {"name": env.name, "role": env.role, "fingerprint": t.fingerprint, "rows": len(t),
                           "features": len(t.features)}
    if env.test:
        out["test_rows"] = len(env.table("test"))
    if "chan" not in state:
        state["chan"] = channel.new_secret()
    out["pub"] = channel.public_of(bytes(state["chan"]))
    if env.identity is not None:
        out["sig"] = channel.sign_run_key(env.identity, env.run, env.name, out["pub"])
    return out


def _peers_of(env: PartyEnv, payload: dict[str, Any]) -> list[str]:
    return sorted(k[4:] for k in payload if k.startswith("pub:"))


def psi_setup(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Blind this party's ids, once per run and row set, and announce them sealed to each peer:
    the active party to every passive party, a passive party to the active one. A party re-blinds
    only a list a peer announced this way (:func:`psi_cross`, :func:`psi_align`)."""
    which = str(payload["which"])
    if which not in ("train", "test", "score"):
        raise StepError(f"party {env.name}: no {which!r} rows to intersect")
    once(state, env, f"psi.setup {which}")
    accept_peer_keys(payload, state, env)
    ids = env.table(which).ids
    scalar = psi.new_scalar()
    perm = np.random.default_rng().permutation(len(ids))
    state[f"psi:{which}"] = scalar.to_bytes(32, "big")
    put_array(state, f"perm:{which}", perm)
    blob = psi.blind_ids([str(ids[i]) for i in perm], scalar, str(payload["domain"]).encode())
    active = str(payload["active"])
    if (env.role == "active") != (active == env.name):
        raise StepError(f"party {env.name} is {env.role}; the coordinator names {active!r} the active party")
    to = [p for p in _peers_of(env, payload) if p != env.name] if env.role == "active" else [active]
    return {f"sealed:{p}": peer_channel(state, env, p).seal(blob, f"psi-announce-{which}") for p in to}


def psi_cross(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Passive party: re-blind the active party's announced list, once per run and row set."""
    if env.role != "passive":
        raise StepError(f"party {env.name} is {env.role}; only a passive party re-blinds the active party's list")
    which, active = str(payload["which"]), str(payload["active"])
    if f"psi:{which}" not in state:
        raise StepError(f"party {env.name}: psi.cross before psi.setup of its {which} rows")
    blob = open_from(state, env, active, payload["sealed"], f"psi-announce-{which}")
    once(state, env, f"psi.cross {which}")
    scalar = int.from_bytes(bytes(state[f"psi:{which}"]), "big")
    crossed = psi.reblind(blob, scalar, f"the active party's {which} ids")
    return {"sealed": peer_channel(state, env, active).seal(crossed, f"psi-cross-{which}")}


def psi_align(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Active party: the common customers, their order, and each passive party's positions (sealed)."""
    if env.role != "active":
        raise StepError(f"party {env.name} is {env.role}; only the active party aligns")
    which = str(payload["which"])
    if f"psi:{which}" not in state:
        raise StepError(f"party {env.name}: psi.align before psi.setup of its {which} rows")
    scalar = int.from_bytes(bytes(state[f"psi:{which}"]), "big")
    peers = json.loads(str(payload["peers"]))
    if not isinstance(peers, list) or not peers or len(set(peers)) != len(peers):
        raise StepError(f"party {env.name}: psi.align needs the list of distinct passive parties")
    opened = [(open_from(state, env, p, payload[f"own:{p}"], f"psi-cross-{which}"),
               open_from(state, env, p, payload[f"blob:{p}"], f"psi-announce-{which}")) for p in peers]
    once(state, env, f"psi.align {which}")
    pairs = [(own, psi.reblind(blob, scalar, f"party {p}'s {which} ids")) for p, (own, blob) in zip(peers, opened)]
    own_pos, peer_pos = psi.intersect(pairs)
    perm = get_array(state, f"perm:{which}")
    all_ids = env.table(which).ids
    # the agreed order: by a hash of the run's seed and the id, so that runs reproduce (the
    # blinding scalars are fresh every run) and neither party's file order shows through
    order = np.argsort([hashlib.sha256(f"{env.seed}|{all_ids[r]}".encode()).digest() for r in perm[own_pos]],
                       kind="stable")
    own_pos, peer_pos = own_pos[order], [p[order] for p in peer_pos]
    file_rows = perm[own_pos]
    put_array(state, f"rows:{which}", file_rows)
    ids = all_ids[file_rows]
    out: dict[str, Any] = {"count": int(len(own_pos))}
    for p, pos in zip(peers, peer_pos):
        ch = peer_channel(state, env, p)
        out[f"sealed:{p}"] = ch.seal(pos.astype("<i8").tobytes(), f"psi-{which}")
        out[f"digest:{p}"] = psi.digest(ch.key, ids)
    return out


def psi_accept(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Passive party: open the positions the active party sent, keep the aligned rows."""
    which = str(payload["which"])
    active = str(payload["active"])
    ch = peer_channel(state, env, active)
    pos = np.frombuffer(open_from(state, env, active, payload["sealed"], f"psi-{which}"), dtype="<i8")
    once(state, env, f"psi.accept {which}")
    perm = get_array(state, f"perm:{which}")
    if pos.size and (pos.min() < 0 or pos.max() >= perm.size):
        raise StepError(f"party {env.name}: the aligned positions point outside its {which} rows")
    file_rows = perm[pos]
    put_array(state, f"rows:{which}", file_rows)
    return {"count": int(pos.size), "digest": psi.digest(ch.key, env.table(which).ids[file_rows])}


Step = Callable[[dict[str, Any], dict[str, Any], PartyEnv], dict[str, Any]]
STEPS: dict[str, Step] = {"hello": hello, "psi.setup": psi_setup, "psi.cross": psi_cross,
                          "psi.align": psi_align, "psi.accept": psi_accept}


def register(steps: dict[str, Step]) -> None:
    """Add a model's steps to the steps a party answers."""
    STEPS.update(steps)


def handle(step: str, payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Run one step at this party; :class:`StepError` / data errors name what is wrong."""
    if step not in STEPS:
        raise StepError(f"unknown vertical step {step!r} (known: {sorted(STEPS)})")
    return STEPS[step](payload, state, env)


def model_path(env: PartyEnv) -> Path:
    """Where the party keeps its part of the vertical model."""
    return Path(env.model_dir) / f"{env.name}.vertical.npz"


def write_part(env: PartyEnv, model: str, arrays: dict[str, np.ndarray], **meta: Any) -> dict[str, Any]:
    """Save this party's part of the model where it keeps models: its arrays, its fitted
    preprocessing and schema fingerprint, the run it came from. Returns the ``save`` step's reply."""
    path = model_path(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = env.table("train")
    info = {"model": model, "party": env.name, "role": env.role, "features": list(t.features),
            "preprocessor": t.prep.to_dict(), "fingerprint": t.fingerprint, "run": env.run, **meta}
    np.savez(path, meta=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8), **arrays)  # type: ignore[arg-type]
    return {"saved": str(path)}


def read_part(env: PartyEnv, model: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The party's saved part of a ``model`` (a scoring run): (its metadata, its arrays)."""
    path = model_path(env)
    if not path.is_file():
        raise StepError(f"party {env.name} has no trained model part at {path}")
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        arrays = {k: z[k] for k in z.files if k != "meta"}
    if meta.get("model") != model:
        raise StepError(f"{path} holds a {meta.get('model')} model part, not {model}")
    return meta, arrays
