"""Split neural network: a bottom model at every party, the top model at the active party.

Each batch: every passive party runs its bottom model on its rows and sends the embeddings,
sealed to the active party (:mod:`vertical.channel`); the active party runs its own bottom
model, the top model on all embeddings side by side and the loss, updates its models and sends
each passive party the gradient of the loss with respect to that party's embeddings, sealed;
the passive party back-propagates it through its bottom model. With no protection this is
exactly centralized training of the joined network (``benchmarks/vertical.py`` measures both).

What crosses, and the protection (``vertical.protection``):

- ``embeddings``: each row's embedding is clipped to L2 norm ``clip`` and Gaussian noise of
  standard deviation ``noise_multiplier * clip`` is added before it leaves the passive party. A
  row's released embedding is then a Gaussian mechanism of L2 sensitivity ``2 * clip`` in that
  row's features, and over ``epochs`` releases it is (epsilon, delta)-DP for that row's features
  (RDP accounting, :func:`epsilon`). Not covered: what the bottom model, trained on every row,
  carries into *other* rows' embeddings.
- ``gradients``: each row's gradient (per example, i.e. scaled by the batch size) is clipped to
  ``clip`` and noised the same way before it leaves the active party: label differential
  privacy for that row's label in what the passive party receives, with the same caveat for
  the top model's parameters.

In a simulation the noise is drawn from the run's seed (runs reproduce bit for bit); a deployed
party draws it from its node config's ``noise-seed`` together with the run's id (two runs never
share their noise, issue #33), else from the operating system, so that the receiving party
cannot recompute it.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from vertical.coordinator import Session, Trainer, metrics_of
from vertical.party import (
    PartyEnv,
    StepError,
    batch_rows,
    finish_scores,
    get_array,
    peer_channel,
    put_array,
    read_part,
    register,
    rows,
    write_part,
)


def mlp(width: int, hidden: list[int], out: int) -> nn.Sequential:
    """An MLP of ``width`` inputs, ``hidden`` ReLU layers and ``out`` outputs."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


def party_seed(seed: int, name: str) -> int:
    """The party's seed of run seed ``seed`` (each party draws its own initial weights)."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{name}".encode()).digest()[:4], "big")


def build(env: PartyEnv, width: int, parties: int) -> nn.ModuleDict:
    """The party's models: its bottom model, and the top model at the active party."""
    torch.manual_seed(party_seed(env.seed, env.name))
    cfg = env.cfg
    mods = {"bottom": mlp(width, list(cfg.hidden), cfg.embedding)}
    if env.role == "active":
        mods["top"] = mlp(cfg.embedding * parties, list(cfg.top_hidden), 1)
    return nn.ModuleDict(mods)


def optimizer(env: PartyEnv, model: nn.Module) -> torch.optim.Optimizer:
    """The party's optimizer of ``model`` (``vertical.optimizer``)."""
    if env.cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=env.cfg.lr)
    return torch.optim.SGD(model.parameters(), lr=env.cfg.lr, momentum=0.9)


def _save(state: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer | None) -> None:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": None if opt is None else opt.state_dict()}, buf)
    state["nn:model"] = buf.getvalue()


def _load(state: dict[str, Any], env: PartyEnv) -> tuple[nn.ModuleDict, torch.optim.Optimizer]:
    if "nn:model" not in state:
        raise StepError(f"party {env.name} has no split-NN model yet (nn.init did not run)")
    model = build(env, int(state["nn:width"]), int(state["nn:parties"]))
    blob = torch.load(io.BytesIO(bytes(state["nn:model"])), weights_only=True)
    model.load_state_dict(blob["model"])
    opt = optimizer(env, model)
    if blob["opt"] is not None:
        opt.load_state_dict(blob["opt"])
    return model, opt


def noise_source(env: PartyEnv, state: dict[str, Any], label: str) -> torch.Generator:
    """The generator of this party's protection noise (see the module docstring)."""
    count = int(state.get("nn:draws", 0))
    state["nn:draws"] = count + 1
    g = torch.Generator()
    if env.noise_secret is not None:  # the party's own secret, and the run: no two runs share their noise
        text = f"{env.noise_secret}|run={env.run}|{env.name}|{label}|{count}"
    elif not env.deployed:  # a simulation: the run's seed (runs reproduce bit for bit)
        text = f"{env.seed}|{env.name}|{label}|{count}"
    else:
        g.manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)
        return g
    g.manual_seed(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1)
    return g


def clip_rows(t: torch.Tensor, c: float) -> torch.Tensor:
    """Each row scaled down to L2 norm ``c`` at most (inside the autograd graph when ``t`` is in one)."""
    return t * torch.clamp(c / t.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)


def noise(t: torch.Tensor, env: PartyEnv, state: dict[str, Any], label: str) -> torch.Tensor:
    """``t`` plus Gaussian noise of std ``noise_multiplier * clip`` from the party's noise source."""
    return t + torch.randn(t.shape, generator=noise_source(env, state, label)) * (env.cfg.noise_multiplier * env.cfg.clip)


def protect(t: torch.Tensor, env: PartyEnv, state: dict[str, Any], label: str) -> torch.Tensor:
    """Clip each row to ``clip`` (L2) and add Gaussian noise of std ``noise_multiplier * clip``."""
    return noise(clip_rows(t, env.cfg.clip), env, state, label)


def _x(env: PartyEnv, which: str, state: dict[str, Any], idx: np.ndarray | None = None) -> torch.Tensor:
    """The party's inputs of the aligned ``which`` rows (only batch ``idx`` of them, if given)."""
    r = rows(state, which)
    return torch.from_numpy(env.table(which).x[r if idx is None else r[idx]].astype(np.float32))


def init(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Step ``init``: build the party's bottom model (and the active party's top model)."""
    width = len(env.table("train").features)
    state["nn:width"], state["nn:parties"] = width, int(payload["parties"])
    model = build(env, width, int(payload["parties"]))
    _save(state, model, optimizer(env, model))
    return {}


def _embed(model: nn.ModuleDict, x: torch.Tensor, env: PartyEnv) -> torch.Tensor:
    h = model["bottom"](x)
    if env.cfg.protection in ("embeddings", "both"):  # clip inside the graph; the noise is added after
        h = clip_rows(h, env.cfg.clip)
    return h


def forward(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Passive party: finish the last batch (its gradient), then this batch's embeddings, sealed."""
    model, opt = _load(state, env)
    active = str(payload["active"])
    ch = peer_channel(state, env, active)
    if "grad" in payload:
        prev = get_array(state, "nn:idx")
        x = _x(env, "train", state, prev)
        grad = np.frombuffer(ch.open(bytes(payload["grad"]), "nn-grad"), dtype="<f4")
        if grad.size != len(prev) * env.cfg.embedding:
            raise StepError(f"party {env.name}: {grad.size} gradient values for {len(prev)} rows")
        opt.zero_grad()
        _embed(model, x, env).backward(torch.from_numpy(grad.reshape(len(prev), -1).copy()))
        opt.step()
    out: dict[str, Any] = {}
    if not payload.get("only_update"):
        idx = batch_rows(env, len(rows(state, "train")), int(payload["epoch"]), int(payload["batch"]))
        put_array(state, "nn:idx", idx)
        with torch.no_grad():
            h = _embed(model, _x(env, "train", state, idx), env)
            if env.cfg.protection in ("embeddings", "both"):
                h = noise(h, env, state, "emb")
        out["sealed"] = ch.seal(h.numpy().astype("<f4").tobytes(), "nn-emb")
    _save(state, model, opt)
    return out


def _opened(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv, rows_: int, label: str
            ) -> list[torch.Tensor]:
    out = []
    for p in str(payload["peers"]).split(","):
        raw = np.frombuffer(peer_channel(state, env, p).open(bytes(payload[f"sealed:{p}"]), label), dtype="<f4")
        if raw.size != rows_ * env.cfg.embedding:
            raise StepError(f"party {p} sent {raw.size} embedding values for {rows_} rows")
        out.append(torch.from_numpy(raw.reshape(rows_, -1).copy()))
    return out


def top(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Active party: the top model on every embedding; the loss; updates; gradients sealed back."""
    if env.role != "active":
        raise StepError(f"party {env.name} is {env.role}; only the active party holds the top model")
    model, opt = _load(state, env)
    idx = batch_rows(env, len(rows(state, "train")), int(payload["epoch"]), int(payload["batch"]))
    peers = str(payload["peers"]).split(",")
    received = [h.requires_grad_(True) for h in _opened(payload, state, env, len(idx), "nn-emb")]
    y = env.table("train").y
    assert y is not None
    target = torch.from_numpy(y[rows(state, "train")][idx].astype(np.float32))
    opt.zero_grad()
    logits = model["top"](torch.cat([model["bottom"](_x(env, "train", state, idx)), *received], dim=1)).squeeze(1)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
    loss.backward()
    opt.step()
    _save(state, model, opt)
    out: dict[str, Any] = {"loss": float(loss.item())}
    for p, h in zip(peers, received):
        g = h.grad
        assert g is not None
        if env.cfg.protection in ("gradients", "both"):
            g = protect(g * len(idx), env, state, f"grad-{p}") / len(idx)  # per example, then back to the mean
        out[f"grad:{p}"] = peer_channel(state, env, p).seal(g.numpy().astype("<f4").tobytes(), "nn-grad")
    return out


def embed(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Passive party: embeddings of the aligned ``which`` rows (to score), sealed to the active party."""
    model, _ = _load(state, env)
    which = str(payload["which"])
    with torch.no_grad():
        h = _embed(model, _x(env, which, state), env)
        if env.cfg.protection in ("embeddings", "both"):
            h = noise(h, env, state, f"emb-{which}")
    return {"sealed": peer_channel(state, env, str(payload["active"])).seal(h.numpy().astype("<f4").tobytes(),
                                                                             f"nn-score-{which}")}


def score(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Step ``score``: the party's part of the scores of the ``which`` rows."""
    model, _ = _load(state, env)
    which = str(payload["which"])
    n = len(rows(state, which))
    with torch.no_grad():
        parts = _opened(payload, state, env, n, f"nn-score-{which}")
        logits = model["top"](torch.cat([model["bottom"](_x(env, which, state)), *parts], dim=1)).squeeze(1)
    return finish_scores(env, state, which, torch.sigmoid(logits).numpy().astype(np.float64), payload)


def save(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Step ``save``: write the party's part of the model."""
    model, _ = _load(state, env)
    return write_part(env, "split_nn", {f"p:{k}": v.numpy() for k, v in model.state_dict().items()},
                      width=int(state["nn:width"]), parties=int(state["nn:parties"]))


def load(payload: dict[str, Any], state: dict[str, Any], env: PartyEnv) -> dict[str, Any]:
    """Step ``load``: read the party's part of a saved model."""
    meta, arrays = read_part(env, "split_nn")
    state["nn:width"], state["nn:parties"] = int(meta["width"]), int(meta["parties"])
    model = build(env, int(meta["width"]), int(meta["parties"]))
    model.load_state_dict({k[2:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("p:")})
    _save(state, model, None)
    return {"model": "split_nn", "run": str(meta.get("run", ""))}


register({"nn.init": init, "nn.forward": forward, "nn.top": top, "nn.embed": embed, "nn.score": score,
          "nn.save": save, "nn.load": load})


# ---- accounting -------------------------------------------------------------------------------
def epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """(epsilon at ``delta``) of ``releases`` Gaussian releases of one row's clipped tensor:
    sensitivity ``2 * clip``, so the effective noise multiplier is ``noise_multiplier / 2``."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))
    rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier / 2, steps=releases, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def protection_summary(env_cfg: Any) -> dict[str, Any] | None:
    """What ``vertical.protection`` adds to the passive parties' embeddings, for results.json (None without)."""
    c = env_cfg
    if c.protection == "none":
        return None
    eps = epsilon(c.noise_multiplier, c.epochs, c.delta)
    out: dict[str, Any] = {"protection": c.protection, "clip": c.clip, "noise_multiplier": c.noise_multiplier,
                           "delta": c.delta, "releases_per_row": c.epochs}
    if c.protection in ("embeddings", "both"):
        out["epsilon_features_per_row"] = eps
    if c.protection in ("gradients", "both"):
        out["epsilon_label_per_row"] = eps
    return out


# ---- coordinator half -------------------------------------------------------------------------
def _setup(s: Session) -> None:
    s.send("nn.init", {p: {"parties": len(s.parties)} for p in s.parties}, "init")


def _step(s: Session, epoch: int, batch: int, pending: dict[str, Any] | None) -> dict[str, Any]:
    fwd = {}
    for p in s.passive:
        fwd[p] = {"epoch": epoch, "batch": batch, "active": s.active}
        if pending is not None:
            fwd[p]["grad"] = pending[p]
    out = s.send("nn.forward", fwd, "forward")
    payload: dict[str, Any] = {"epoch": epoch, "batch": batch, "peers": ",".join(s.passive)}
    for p in s.passive:
        payload[f"sealed:{p}"] = s.ledger.relay(p, s.active, out[p]["sealed"])
    r = s.send("nn.top", {s.active: payload}, "top")[s.active]
    s.losses.append(float(r["loss"]))
    return {p: s.ledger.relay(s.active, p, r[f"grad:{p}"]) for p in s.passive}


def _finish_epoch(s: Session, pending: dict[str, Any] | None) -> None:
    if pending is not None:
        s.send("nn.forward", {p: {"grad": pending[p], "only_update": True, "active": s.active} for p in s.passive},
               "backward")


def _score(s: Session, which: str, write: bool) -> dict[str, Any]:
    parts = s.send("nn.embed", {p: {"which": which, "active": s.active} for p in s.passive}, f"score_{which}")
    payload: dict[str, Any] = {"which": which, "peers": ",".join(s.passive), "write": write}
    for p in s.passive:
        payload[f"sealed:{p}"] = s.ledger.relay(p, s.active, parts[p]["sealed"])
    out = metrics_of(s.send("nn.score", {s.active: payload}, f"score_{which}")[s.active])
    if s.losses:
        out["train_loss"] = float(np.mean(s.losses))
        s.losses = []
    return out


def trainer() -> Trainer:
    """The split-NN trainer's steps."""
    return Trainer(_setup, _step, _finish_epoch, _score, "nn")
