"""Vertical runs in Flower: the relay of Flower messages, the party's node, the results.

The ServerApp hands a ``vertical != none`` run to :func:`serve`: a :class:`FlowerRelay` carries the
coordinator's steps (:mod:`vertical.coordinator`) as ``query.fedsilo_vertical`` messages; the
ClientApp answers them with :func:`answer`, which builds the party from the node (simulation:
``vertical.parties[partition-id]``; deployment: the node config's ``role``, ``data-path``,
``schema-path``, optional ``test-path``, ``score-path``, ``party-name``, ``model-dir``,
``noise-seed``) and keeps the party's state in ``context.state``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

import vertical
from app import config
from app.support.paths import resolve_data_dir
from core import recordview
from vertical import channel, coordinator, party, split_nn
from vertical.channel import ChannelError
from vertical.config import PartyConfig, VerticalConfig
from vertical.coordinator import VerticalError
from vertical.data import PartyDataError
from vertical.psi import PSIError

MESSAGE = "query.fedsilo_vertical"
STATE = "fedsilo.vertical"
RESULTS_FILE = "results.json"
PARTY_ERRORS = (PartyDataError, party.StepError, ChannelError, PSIError, ValueError, KeyError, ImportError)


def resolved(cfg: config.FedsiloConfig) -> VerticalConfig:
    """The vertical config with the parties' relative paths under ``data_dir``."""
    data_dir = resolve_data_dir(cfg.data_dir)

    def at(p: str | None) -> str | None:
        if not p:
            return p
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else data_dir / q)

    v = cfg.vertical
    parties = [PartyConfig(p.name, p.role, at(p.data) or "", at(p.test), at(p.schema) or "") for p in v.parties]
    return replace(v, parties=parties, score=[at(s) or "" for s in v.score])


# ---- the coordinator's relay ----------------------------------------------------------------------
class FlowerRelay:
    """Steps as Flower messages; a party's error reply stops the run with its reason."""

    def __init__(self, grid: Grid, timeout: float) -> None:
        self.grid, self.timeout = grid, timeout
        self.nodes: dict[str, int] = {}

    def _exchange(self, step: str, payloads: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        msgs = [Message(RecordDict({"config": ConfigRecord({"step": step, **p})}), dst_node_id=n,
                        message_type=MESSAGE) for n, p in payloads.items()]
        replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
        names = {n: name for name, n in self.nodes.items()}
        out: dict[int, dict[str, Any]] = {}
        for r in replies:
            who = names.get(r.metadata.src_node_id, f"node {r.metadata.src_node_id}")
            if r.has_error():
                raise VerticalError(f"party {who} failed step {step}: {r.error.reason}")
            rec = r.content.config_records.get("reply")
            if rec is None:
                raise VerticalError(f"party {who} sent a malformed reply to step {step} (no 'reply' record)")
            if "error" in rec:
                who = str(rec.get("name", who))
                raise VerticalError(f"party {who} refused step {step}: {rec['error']}")
            out[r.metadata.src_node_id] = dict(rec.items())
        missing = [names.get(n, n) for n in payloads if n not in out]
        if missing:
            raise VerticalError(f"party/parties {missing} did not answer step {step} within {self.timeout:.0f} s")
        return out

    def hello(self, payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Greet every connected node; each party's reply, by party name."""
        nodes = list(self.grid.get_node_ids())
        replies = self._exchange("hello", {n: payload for n in nodes})
        by_name: dict[str, dict[str, Any]] = {}
        for n, r in replies.items():
            name = str(r.get("name"))
            if name in by_name:
                raise VerticalError(f"two nodes call themselves party {name!r}: party names must be distinct")
            self.nodes[name], by_name[name] = n, r
        return by_name

    def send(self, step: str, payloads: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Send one step to the named parties; their replies, by party name."""
        unknown = [p for p in payloads if p not in self.nodes]
        if unknown:
            raise VerticalError(f"no node is party {unknown}")
        replies = self._exchange(step, {self.nodes[p]: v for p, v in payloads.items()})
        names = {n: p for p, n in self.nodes.items()}
        return {names[n]: r for n, r in replies.items()}


def visibility(v: VerticalConfig) -> dict[str, str]:
    """What each party and the coordinator can see, for results.json and the report."""
    common = ("the intersection: its own rows that are in it, and the size of every other party's id set "
              "(Diffie-Hellman PSI; other ids reach it only blinded)")
    if v.name == "hetero_lr":
        return {
            "coordinator": "set sizes, the intersection size, and ciphertexts, masked values and sealed bytes it "
                           "cannot open; no key, id, feature, label, score or weight; the active party's test metrics",
            "active": common + "; its own gradient each step; the passive parties' ciphertexts under their keys "
                               "(unreadable) and its decryptions of their masked gradients (uniformly masked); "
                               "the combined scores of scored customers (so the passive parties' partial scores)",
            "passive": common + "; its own gradient each step; the active party's ciphertexts (unreadable) and "
                                "its decryptions of the active party's masked gradient (uniformly masked)"}
    if v.name == "secureboost":
        return {
            "coordinator": "set sizes, the intersection size, the number of trees and levels, which party each "
                           "level asks to split and sealed bytes it cannot open; no key, id, feature, label, "
                           "gradient, threshold or score; the active party's test metrics",
            "active": common + "; per open node, its gradient and hessian sums over each passive party's bin groups "
                               f"(each of at least {v.boost.min_bin_rows} of the node's rows, if > 0), and for each "
                               "split on a passive party's column which rows go left (training and scoring); never a "
                               "passive party's value or threshold",
            "passive": common + "; which common customers share a node at each level of the trees it takes part "
                                f"in (not the first {v.boost.active_trees} trees), and its own chosen thresholds; "
                                "only ciphertexts of the gradients, never a label"}
    emb = ("noised embeddings (clip and Gaussian noise, see privacy)" if v.protection in ("embeddings", "both")
           else "the passive parties' embeddings of every common customer, in the clear")
    grad = ("noised gradients (clip and Gaussian noise, see privacy)" if v.protection in ("gradients", "both")
            else "the gradient of the loss for each of its embeddings, in the clear (it carries label information)")
    return {"coordinator": "set sizes, the intersection size and sealed bytes it cannot open; the training loss "
                           "and the active party's test metrics",
            "active": common + "; " + emb,
            "passive": common + "; " + grad}


def serve(grid: Grid, context: Context, cfg: config.FedsiloConfig, out_dir: Path) -> None:
    """Run a vertical training or scoring run and write ``results.json`` (and the parties' model parts)."""
    v = resolved(cfg)
    trainer = vertical.trainer(v.name)
    relay = FlowerRelay(grid, timeout=max(600.0, cfg.strategy.round_timeout))
    out_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"run_id": context.run_id, "kind": "vertical", "model": v.name, "mode": v.mode,
                              "overrides": str(context.run_config.get("overrides", "")),
                              "config": config.to_dict(cfg), "visibility": visibility(v), "status": "running"}
    t0 = time.perf_counter()

    progress: list[dict[str, Any]] = []

    def on_epoch(epoch: int, metrics: dict[str, Any], secs: float) -> None:
        shown = " ".join(f"{k}={metrics[k]:.4f}" for k in ("auc", "accuracy", "loss", "train_loss") if k in metrics)
        log(INFO, "fedsilo vertical epoch %s/%s | test %s | %.1f s", epoch, v.epochs, shown or "-", secs)
        progress.append({"epoch": epoch, "seconds": round(secs, 3), **coordinator.finite(metrics)})
        (out_dir / RESULTS_FILE).write_text(json.dumps({**record, "epochs_so_far": progress}, indent=1,
                                                       default=str) + "\n")  # readable while the run goes on

    try:
        if v.mode == "score":
            body = coordinator.score_run(relay, v, cfg.seed, str(context.run_id), trainer)
            record["final"] = coordinator.finite(body.get("score", {}))
        else:
            body = coordinator.run(relay, v, cfg.seed, str(context.run_id), trainer, on_epoch)
            record["final"] = coordinator.finite({k: x for k, x in body["final"].items() if k != "bytes"})
            summary = split_nn.protection_summary(v) if v.name == "split_nn" else None
            if summary is not None:
                record["privacy"] = {"mechanism": "vertical", **summary}
        record.update({"status": "completed", "vertical": body, "seconds": round(time.perf_counter() - t0, 3)})
    except VerticalError as err:
        record.update({"status": "failed", "error": str(err), "seconds": round(time.perf_counter() - t0, 3)})
        (out_dir / RESULTS_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
        log(ERROR, "fedsilo vertical: %s", err)
        raise
    path = out_dir / RESULTS_FILE
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    log(INFO, "fedsilo vertical: %s %s; results written to %s", v.name, v.mode, path)


# ---- the party's node -------------------------------------------------------------------------------
def party_env(context: Context, cfg: config.FedsiloConfig) -> party.PartyEnv:
    """The node as a party: from its node config (deployment) or from ``vertical.parties`` (simulation)."""
    node = context.node_config
    v = resolved(cfg)
    run = str(context.run_id)
    if "data-path" in node:
        data = str(node["data-path"])
        role = str(node.get("role", ""))
        if role not in ("active", "passive"):
            raise PartyDataError(f"this node's config has role={role!r}; a vertical party needs "
                                 "--node-config 'role=\"active\"' or 'role=\"passive\"'")
        if "schema-path" not in node:
            raise PartyDataError("this node's config has no schema-path: a vertical party reads its file "
                                 "through its schema (with the id column)")
        model_dir = str(node.get("model-dir", Path(data).expanduser().resolve().parent / "fedsilo-models"))
        identity = channel.load_identity(str(node["party-key"])) if "party-key" in node else None
        pinned = channel.load_pinned(str(node["peer-keys"])) if "peer-keys" in node else None
        return party.PartyEnv(str(node.get("party-name", Path(data).stem)), role, data, str(node["schema-path"]),
                              str(node["test-path"]) if "test-path" in node else None,
                              str(node["score-path"]) if "score-path" in node else None, model_dir, run, cfg.seed, v,
                              deployed=True,
                              noise_secret=str(node["noise-seed"]) if "noise-seed" in node else None,
                              identity=identity, pinned=pinned)
    pid = int(node.get("partition-id", -1))
    if not 0 <= pid < len(v.parties):
        raise PartyDataError(f"node partition-id {pid} has no party in vertical.parties ({len(v.parties)} parties)")
    p = v.parties[pid]
    base = v.model_dir if v.mode == "score" and v.model_dir else str(context.run_config.get("output-dir", "") or ".")
    return party.PartyEnv(p.name, p.role, p.data, p.schema, p.test, v.score[pid] if v.score else None,
                          str(Path(base) / "parties"), run, cfg.seed, v)


def answer(msg: Message, context: Context) -> Message:
    """One coordinator step at this party; a refusal carries the reason (never data)."""
    cfg = config.site_config(context.run_config, context.node_config)
    step, name = "", ""
    try:
        payload = dict(msg.content["config"].items())  # type: ignore[union-attr]
        step = str(payload.pop("step"))
        vertical.module(cfg.vertical.name)  # registers the model's party steps
        env = party_env(context, cfg)
        name = env.name
        held = recordview.config(context.state, STATE)
        if held is None:
            held = context.state[STATE] = ConfigRecord()
        state = dict(held.items())
        t0 = time.perf_counter()
        reply = party.handle(step, payload, state, env)
        reply["_secs"] = time.perf_counter() - t0
        context.state[STATE] = ConfigRecord(state)  # type: ignore[arg-type]
    except PARTY_ERRORS as err:
        log(ERROR, "fedsilo vertical: step %s refused: %s", step, err)
        reason = getattr(err, "public", str(err))  # file, column and row; the value only in the party's own log
        reply = {"error": f"{type(err).__name__}: {reason}", **({"name": name} if name else {})}
    return Message(RecordDict({"reply": ConfigRecord(reply)}), reply_to=msg)  # type: ignore[arg-type]
