"""Paillier's pooled metrics are no decryption oracle (issue #33, attack 1).

A real run (``task=tabular aggregation=paillier``, in process, the real ServerApp and ClientApps)
records what the coordinator sent and received; then the test sends, to a key-holding site, the
reveal requests a deviating coordinator would: one site's own ciphertexts (its training update,
its statistics vector), a single contribution, forged or missing MACs, a subset of the listed
participants, a statistics sum, the genuine request again, and the same content under a new sum id.
Each is refused, and the site decrypts nothing.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from aggregation.base import SUM_REQUEST
from aggregation.paillier import keys
from aggregation.paillier.sums import REPLY_KEY, REVEAL_KEY, REVEAL_MESSAGE
from app import client_app, server_app
from tests.conftest import DATA_DIR
from tests.integration.recording import Recording
from tests.integration.recording import ask_reveal as _ask
from tests.integration.recording import assert_refused as _refused

HEART = ["task=tabular", "learner.name=torch",
         "task.schema=schemas/heart.yaml", "task.data=uci_heart_disease/sites", "partition=natural",
         "task.model=logreg", "num_rounds=1", "task.auc_bins=256"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Recording, dict[str, Any]]:
    import json

    tmp = tmp_path_factory.mktemp("paillier-oracle")
    private, public = keys.generate(tmp / "keys")
    overrides = [*HEART, "aggregation=paillier", f"aggregation.public_key={public}"]
    run_config = {"overrides": shlex.join([*overrides, f"data_dir={DATA_DIR}"]), "output-dir": str(tmp)}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = Recording(client_app.app, 4, run_config, node_config={"paillier-keypair": str(private)})
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return grid, json.loads((tmp / "results.json").read_text())




def _genuine(grid: Recording) -> tuple[Message, Message]:
    return next((m, r) for m, r in grid.log if m.metadata.message_type == REVEAL_MESSAGE and not r.has_error())


def test_the_honest_run_reveals_its_pooled_metrics(recorded: tuple[Recording, dict[str, Any]]) -> None:
    grid, results = recorded
    assert results["status"] == "completed" and results["final"]["test_sites"] == 4
    assert "auc" in results["final"]
    msg, reply = _genuine(grid)
    assert len(reply.content[REVEAL_KEY]["values"]) == int(msg.content[REVEAL_KEY]["length"])


def test_one_sites_own_ciphertexts_are_never_decrypted(recorded: tuple[Recording, dict[str, Any]]) -> None:
    grid, _ = recorded
    msg, _ = _genuine(grid)
    good = dict(msg.content[REVEAL_KEY])
    node = grid.contexts.__iter__().__next__()
    # the review's attack: one site's statistics vector (its sum reply), sent to be "revealed" as it was before #33
    one = next(r for m, r in grid.log if REPLY_KEY in r.content.config_records)
    old_style = {"ct": list(one.content[REPLY_KEY]["ct"]), "length": good["length"]}
    _refused(_ask(grid, node, old_style), "malformed reveal request")
    # a training update's ciphertexts in the reveal's place, under the genuine MACs: not authenticated
    update = next(r for m, r in grid.log if m.metadata.message_type.startswith("train") and not r.has_error())
    arrays = next(iter(update.content.array_records.values()))
    blob = next(iter(arrays.values())).numpy().tobytes()
    width = len(good["parts"][0])
    forged = [blob[i:i + width] for i in range(0, width * good["count"], width)]
    parts = list(good["parts"])
    parts[: good["count"]] = forged[: good["count"]]
    _refused(_ask(grid, node, {**good, "sum": good["sum"] + 100, "parts": parts}), "not authenticated")
    # a single site's contribution, as a "sum" of one
    single = {**good, "sum": good["sum"] + 101, "participants": good["nodes"][:1], "nodes": good["nodes"][:1],
              "macs": good["macs"][:1], "parts": good["parts"][: good["count"]]}
    _refused(_ask(grid, node, single), "at least 2 distinct sites")
    # three of the four listed participants: the fourth's contribution withheld (to difference two totals)
    subset = {**good, "sum": good["sum"] + 102, "nodes": good["nodes"][:3], "macs": good["macs"][:3],
              "parts": good["parts"][: 3 * good["count"]]}
    _refused(_ask(grid, node, subset), "each listed participant's, once")
    # the same contributions with one MAC flipped
    macs = list(good["macs"])
    macs[1] = bytes([macs[1][0] ^ 1]) + macs[1][1:]
    _refused(_ask(grid, node, {**good, "sum": good["sum"] + 103, "macs": macs}), "not authenticated")


def test_each_sum_is_revealed_once_and_statistics_never(recorded: tuple[Recording, dict[str, Any]]) -> None:
    grid, _ = recorded
    msg, _ = _genuine(grid)
    good = dict(msg.content[REVEAL_KEY])
    node = msg.metadata.dst_node_id
    _refused(_ask(grid, node, good), "revealed by this site already")
    _refused(_ask(grid, node, {**good, "what": "moments"}), "only pooled test metrics")


def test_the_same_content_is_contributed_to_once(recorded: tuple[Recording, dict[str, Any]]) -> None:
    grid, _ = recorded
    request = next(m for m, r in grid.log if SUM_REQUEST in m.content.config_records
                   and str(m.content[SUM_REQUEST]["what"]) == "evaluate" and not r.has_error())
    node = request.metadata.dst_node_id
    again = RecordDict(dict(request.content.items()))
    rec = ConfigRecord(dict(request.content[SUM_REQUEST]))
    rec["id"] = int(rec["id"]) + 50
    again[SUM_REQUEST] = rec
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(again, dst_node_id=node, message_type=request.metadata.message_type)
    _refused(client_app.app(msg, grid.contexts[node]), "does not contribute to one content twice")
    # a request that does not list the site among its participants
    rec2 = ConfigRecord(dict(request.content[SUM_REQUEST]))
    rec2["participants"] = [n for n in rec2["participants"] if n != node]
    rec2["id"] = int(rec2["id"]) + 51
    other = RecordDict(dict(request.content.items()))
    other[SUM_REQUEST] = rec2
    _refused(client_app.app(Message(other, dst_node_id=node, message_type=request.metadata.message_type),
                            grid.contexts[node]), "does not list this site")


def test_a_policy_can_ask_for_more_sites_than_the_sum_has(recorded: tuple[Recording, dict[str, Any]]) -> None:
    from aggregation.paillier.sums import SumRefused, check_reveal, contribution_key

    grid, _ = recorded
    msg, _ = _genuine(grid)
    private = keys.load_private(Path(str(next(iter(grid.contexts.values())).node_config["paillier-keypair"])))
    key = contribution_key(private.p, private.q)
    columns, _ = check_reveal(msg.content[REVEAL_KEY], key, 1, 4, [])  # the genuine request: 4 sites, verified
    assert len(columns) == 4
    with pytest.raises(SumRefused, match="at least 5 distinct sites"):
        check_reveal(msg.content[REVEAL_KEY], key, 1, 5, [])
    with pytest.raises(SumRefused, match="not authenticated"):  # the MACs are bound to the run
        check_reveal(msg.content[REVEAL_KEY], key, 2, 4, [])
    # and a site whose policy asks for 5 sites refuses a run that declares 4, before any work
    node = next(n for n in grid.contexts if n != msg.metadata.dst_node_id)
    ctx = grid.contexts[node]
    ctx.run_config["overrides"] = ctx.run_config["overrides"] + " site_policy.aggregation.min_sites=5"
    try:
        _refused(_ask(grid, node, dict(msg.content[REVEAL_KEY])), "below the policy's aggregation.min_sites=5")
    finally:
        ctx.run_config["overrides"] = ctx.run_config["overrides"].removesuffix(" site_policy.aggregation.min_sites=5")
