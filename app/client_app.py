"""fedsilo's ClientApp: what runs at each site.

Every message passes the site's guard first (:mod:`app.site_guard`, a Flower mod: the run config
as data, the site's own policy); then each handler, under :func:`site_handler` (one torch thread,
the site's plan resolved once per run and node by :func:`app.plan.site_plan`, refusals that name
file, column and row for the site's own data errors), does one thing:

* :func:`train`: one round of local work through the site's layers (:mod:`app.composition`): the
  aggregation option's site half turns the message into the global model (decrypting under
  Paillier); the strategy's systems-heterogeneity plan says how much work this round gets and its
  site term (FedProx's proximal term) joins the objective; the privacy option's trainer trains
  (plain, or DP-SGD with the site's ledger); the aggregation option's site half sends the update
  in its form (in the clear, masked, encrypted);
* :func:`evaluate`: the global model on the site's validation rows;
* :func:`query`: a protocol message of the aggregation option (secure aggregation's key stages);
* :func:`program_query`: a step of a protected-sum program (:mod:`aggregation.programs`);
* :func:`personal_query`: the final global and personal models on the site's own held-out rows;
* :func:`vertical_query`: a step of a vertical federation (:mod:`app.vertical`).

Handlers are module-level functions: the simulation engine pickles the ClientApp with every
message, and a closure would be pickled by value.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import aggregation
import strategies
from aggregation import programs
from aggregation.base import LocalResult, SiteEnv
from app import site_guard
from app.faults import attacks, slow
from app.faults import dropouts as faults
from app.plan import DATA_ERRORS, SitePlan, refused, site_plan
from core.programs import PolicyRefusal, ProgramError
from core.replies import ReplyError, SiteRefusal
from core.seeding import seed_for
from core.sites import SITE_KEY, WEIGHT_KEY, site_record_for
from core.state import JOB_KEY, SiteStore, default_root
from strategies import heterogeneity, personal
from strategies.site import SiteRound, StrategySite, model_part
from tasks.base import SiteData
from tasks.metrics import summary_for
from tasks.training import Penalty, held_out_scores, predict, steps_per_epoch

#: Every message passes the site's guard first: the run config as data, the site's own policy (app/site_guard.py).
app = ClientApp(mods=[site_guard.guard])

Handler = Callable[[Message, Context, SitePlan], Message]


def site_handler(*also_refused: type[Exception]) -> Callable[[Handler], Callable[[Message, Context], Message]]:
    """A message handler's per-message concerns, once: one torch thread, the site's plan, and a refusal
    (never a crash) for what the site's policy refuses, for its own data or schema not fitting the
    federation, and for ``also_refused``."""

    def wrap(handler: Handler) -> Callable[[Message, Context], Message]:
        @functools.wraps(handler)
        def run(msg: Message, context: Context) -> Message:
            torch.set_num_threads(1)
            try:
                return handler(msg, context, site_plan(context))
            except PolicyRefusal as err:
                return site_guard.refusal(msg, context, str(err))
            except (*DATA_ERRORS, *also_refused) as err:
                return refused(msg, context, err)

        return run

    return wrap


def _local_update(msg: Message, context: Context, plan: SitePlan, site: SiteData, env: SiteEnv) -> LocalResult:
    """The round's local work; :class:`SiteRefusal` for a site that misses the round."""
    cfg, task, layers = plan.cfg, plan.task, plan.layers
    train_config = msg.content["config"]
    server_round = int(train_config["server-round"])  # type: ignore[index,call-overload]
    stage = layers.aggregation.train_stage
    if faults.drops(cfg, server_round, site.site_id, stage, plan.num_sites):
        raise SiteRefusal(ReplyError.DROPPED, faults.reason(stage))
    slowdown = slow.slowdown(cfg, site.site_id, plan.num_sites)
    work = heterogeneity.plan(
        cfg.strategy, cfg.task.local_epochs, steps_per_epoch(len(site.train), cfg.task.batch_size),
        cfg.seed, server_round, site.site_id, plan.num_sites, slowdown,
    )
    if work.dropped:
        raise SiteRefusal(ReplyError.MISSED_DEADLINE, heterogeneity.MISSED_DEADLINE)
    model = task.build_model()
    glob = layers.aggregation.global_state(msg, context, model.state_dict())
    seed = seed_for(cfg.seed, server_round, site.site_id)
    half, rnd = strategy_round(plan, site, context, train_config, server_round, seed)  # type: ignore[arg-type]
    penalty = half.start(glob, model, rnd)  # the model's weights (personal layers too) and the extra term
    byzantine = env.attacker
    train_rows = attacks.poison_data(cfg, site.train) if byzantine else site.train
    started = time.perf_counter()
    stats, records = layers.trainer.train(task, model, train_rows, seed, context, train_config,  # type: ignore[arg-type]
                                          site.name, work.epochs, work.max_steps, penalty, rnd.store,
                                          limits=plan.limits)
    slow.wait(slowdown, time.perf_counter() - started)  # faults.slow_fraction: this site computes slowly
    if byzantine:  # faults.byzantine_fraction: this site corrupts what it sends (for robustness studies)
        model.load_state_dict(attacks.poison_model(cfg, model.state_dict(), model_part(glob, model), server_round,
                                                   site.site_id))
    state = half.finish(model, glob, stats, rnd)  # the reply's record: the model and the strategy's side values
    site_rec = site_record_for(site.site_id, site.name, server_round, work.straggler)
    buffers = frozenset(name for name, _ in model.named_buffers())
    return LocalResult(state, stats, {SITE_KEY: site_rec, **records}, server_round, rnd.store, buffers, glob)


def strategy_round(plan: SitePlan, site: SiteData, context: Context, train_config: ConfigRecord, server_round: int,
                   seed: int) -> tuple[StrategySite, SiteRound]:
    """The strategy's site half and what it may use this round: the site's own state store (node
    config ``state-dir``, else :func:`core.state.default_root`) under the coordinator's job id,
    and a trainer for personal models on the site's training rows (plain training, seeded apart
    from the round's own)."""
    task = plan.task
    store = None
    if JOB_KEY in train_config:
        root = plan.node.get("state-dir") or default_root()
        store = SiteStore(str(root), str(train_config[JOB_KEY]), site.name)

    def train_more(model: torch.nn.Module, penalty: Penalty | None, epochs: int, lr: float) -> dict[str, float]:
        return task.train(model, site.train, seed_for(seed, 0x9E75), epochs=epochs, penalty=penalty, lr=lr)

    return strategies.site(plan.cfg.strategy), SiteRound(train_config, server_round, store, task.cfg.lr,
                                                         task.cfg.momentum, train_more)


@site_handler()
def train(msg: Message, context: Context, plan: SitePlan) -> Message:
    """Load the global model, do this round's local work, reply through the aggregation option.

    The amount of work comes from the strategy's systems-heterogeneity settings
    (:mod:`strategies.heterogeneity`); the objective gets the term the server asked for
    (FedProx's proximal term when ``proximal-mu > 0``). The reply's weight is the site's
    number of training rows, whatever share of its work it managed.
    """
    site = plan.site_data(msg, context)
    env = plan.env(context)
    try:
        result = _local_update(msg, context, plan, site, env)
    except SiteRefusal as refusal:
        return refusal.reply(msg, site.name)
    return plan.layers.aggregation.reply(msg, context, result, env)


@site_handler()
def query(msg: Message, context: Context, plan: SitePlan) -> Message:
    """A protocol message of the aggregation option (e.g. secure aggregation's key stages)."""
    return plan.layers.aggregation.query(msg, context, plan.env(context))


@app.evaluate()
@site_handler()
def evaluate(msg: Message, context: Context, plan: SitePlan) -> Message:
    """Score the global model on the site's validation rows (counts, loss, site AUC)."""
    site, task, half = plan.site_data(msg, context), plan.task, plan.layers.aggregation
    server_round = int(msg.content["config"].get("server-round", 0))  # type: ignore[union-attr,call-overload]
    model = task.build_model()
    model.load_state_dict(half.global_state(msg, context, model.state_dict()))
    scores, loss = predict(model, site.val.x, site.val.y, kind=task.label_kind)
    summary = summary_for(task.label_kind, site.val.y.numpy(), scores, loss)
    content = RecordDict({
        "metrics": MetricRecord({WEIGHT_KEY: len(site.val), **summary}),
        SITE_KEY: site_record_for(site.site_id, site.name, server_round),
    })
    half.after_evaluate(context, model)  # e.g. Paillier's next obfuscators, ahead of training
    return Message(content, reply_to=msg)


@app.query("fedsilo_personal")
@site_handler(personal.PersonalError, ValueError, KeyError)
def personal_query(msg: Message, context: Context, plan: SitePlan) -> Message:
    """The final global model and this site's personal model on its own held-out rows and its validation
    rows (:func:`strategies.personal.site_scores`); the reply holds these summaries only."""
    site, rows, _ = plan.own_test_rows(msg, context)
    config_rec = msg.content["config"]
    server_round = int(config_rec["server-round"])  # type: ignore[index,call-overload]
    model = plan.task.build_model()
    glob = plan.layers.aggregation.global_state(msg, context, model.state_dict())
    half, rnd = strategy_round(plan, site, context, config_rec, server_round,  # type: ignore[arg-type]
                               seed_for(plan.cfg.seed, server_round, site.site_id))
    out = personal.site_scores(half, rnd, glob, model, rows, site.val,
                               functools.partial(held_out_scores, plan.task.label_kind), plan.cfg.strategy.personal_select)
    return Message(RecordDict({"personal": MetricRecord(out),  # type: ignore[arg-type]
                               SITE_KEY: site_record_for(site.site_id, site.name, server_round)}), reply_to=msg)


@site_handler(ProgramError, ValueError, KeyError)
def program_query(msg: Message, context: Context, plan: SitePlan) -> Message:
    """A step of a protected-sum program: this site's share of a sum (preprocessing statistics, test
    metrics, a sum-based learner's statistics) or its public value of a gather step."""
    return programs.site_answer(msg, context, plan.layers.aggregation, plan.env(context), plan.source, plan.task,
                                plan.policy)


@app.query("fedsilo_vertical")
def vertical_query(msg: Message, context: Context) -> Message:
    """A step of a vertical federation (:mod:`app.vertical`)."""
    torch.set_num_threads(1)
    from app import vertical

    return vertical.answer(msg, context)


# Every option's messages reach the same handlers: the ClientApp knows no option by name.
app.train()(train)
for _name in aggregation.train_names():
    app.train(_name)(train)
for _name in aggregation.query_names():
    app.query(_name)(query)
for _name in (*aggregation.sum_names(), programs.GATHER_MESSAGE):
    app.query(_name.removeprefix("query."))(program_query)
