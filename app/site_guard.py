"""The site's guard: every message checked against the site's own policy before any work.

A Flower mod (:func:`guard`) on fedsilo's ClientApp. For every message it

1. reads the run config as data (:func:`app.config.site_config`: no interpolation, no Hydra
   keys, no path the site would read; the site's data, schema and state come from its node
   config);
2. takes the site's policy (:func:`app.site_policy.of`: its own file, never the run's, except in
   a simulation);
3. checks the run against it (:func:`check_run`): task and schema, rounds, aggregation option and
   the fewest sites, the privacy the site requires and the bounds of the DP mechanism;

and refuses with a reason (``ReplyError.POLICY``) if anything fails, before the handler runs.
What depends on a message's own fields (a sum request's bins, a vocabulary, a decryption) is
checked where the field is read, against the same policy (:func:`policy_for`).
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

from flwr.app import Context, Message
from flwr.common import log

import privacy
from app import config, site_policy
from app.site_policy import SitePolicy
from core.replies import ReplyError, SiteRefusal
from privacy.base import SiteLimits


def policy_for(context: Context, cfg: config.FedsiloConfig | None = None) -> SitePolicy:
    """The policy this site answers ``context``'s run by."""
    return site_policy.of(context.node_config, cfg.site_policy if cfg is not None else None)


def limits_of(policy: SitePolicy) -> SiteLimits:
    """The bounds the policy's ``privacy`` section sets the site's privacy mechanism."""
    p = policy.privacy
    return SiteLimits(p.max_epsilon, p.min_noise_multiplier, p.one_release_per_round, p.max_delta)


def privacy_limits(context: Context, cfg: config.FedsiloConfig) -> SiteLimits:
    """The bounds the site's policy sets its privacy mechanism (``privacy.*``)."""
    return limits_of(policy_for(context, cfg))


def check_run(cfg: config.FedsiloConfig, policy: SitePolicy, site_fingerprint: str | None = None) -> list[str]:
    """What in the run's config the policy refuses, one reason per field (names and bounds, never data).

    A pure function of the composed config, the policy's values and the fingerprint: worked out once
    per config and policy (kept on the config, keyed by the policy's full value), then read back for
    every message of the run."""
    memo: dict[tuple[str, str | None], list[str]] = cfg.__dict__.setdefault("_policy_checks", {})
    key = (repr(policy), site_fingerprint)
    if key not in memo:
        memo[key] = _problems(cfg, policy, site_fingerprint)
    return list(memo[key])


def _problems(cfg: config.FedsiloConfig, policy: SitePolicy, site_fingerprint: str | None) -> list[str]:
    out: list[str] = []
    if policy.tasks and cfg.task.name not in policy.tasks:
        out.append(f"task={cfg.task.name} is not one this site trains (policy tasks: {policy.tasks})")
    if policy.schema_sha256 and site_fingerprint is not None and site_fingerprint != policy.schema_sha256:
        out.append(f"this site's schema has fingerprint {site_fingerprint}, not the one its policy agreed to "
                   f"({policy.schema_sha256})")
    if cfg.num_rounds > policy.max_rounds:
        out.append(f"num_rounds={cfg.num_rounds} exceeds the policy's max_rounds={policy.max_rounds}")
    if cfg.vertical.name != "none":
        if cfg.vertical.name not in policy.vertical.allowed:
            out.append(f"vertical={cfg.vertical.name} is not allowed (policy vertical.allowed: {policy.vertical.allowed})")
        return out
    agg = policy.aggregation
    if cfg.aggregation.name not in agg.allowed:
        out.append(f"aggregation={cfg.aggregation.name} is not allowed (policy aggregation.allowed: {agg.allowed})")
    if (n_sites := config.num_sites(cfg)) < agg.min_sites:
        out.append(f"num_sites={n_sites} is below the policy's aggregation.min_sites={agg.min_sites}")
    p = policy.privacy
    if p.required != "none" and cfg.privacy.name != p.required:
        out.append(f"privacy={cfg.privacy.name}: this site's policy requires privacy={p.required}")
    out += privacy.get(cfg.privacy.name).policy_problems(cfg.privacy, limits_of(policy))
    if cfg.task.name == "tabular":
        lo, hi = policy.evaluation.test_fraction
        if not lo <= cfg.task.test_fraction <= hi:
            out.append(f"task.test_fraction={cfg.task.test_fraction:g} is outside the policy's evaluation.test_fraction "
                       f"[{lo:g}, {hi:g}]")
        if cfg.task.auc_bins > policy.evaluation.max_bins:
            out.append(f"task.auc_bins={cfg.task.auc_bins} exceeds the policy's evaluation.max_bins="
                       f"{policy.evaluation.max_bins}")
    return out


def site_name(context: Context) -> str:
    """The site's name for replies and logs (node config ``site-name``, ``party-name`` or ``partition-id``)."""
    node = context.node_config
    return str(node.get("site-name", node.get("party-name", node.get("partition-id", "site"))))


def refusal(msg: Message, context: Context, reason: str) -> Message:
    """The reply to a message the policy refuses (the reason is logged at the site too)."""
    log(WARNING, "site %s refuses %s: %s", site_name(context), msg.metadata.message_type, reason)
    return SiteRefusal(ReplyError.POLICY, reason).reply(msg, site_name(context))


def guard(msg: Message, context: Context, call_next: Any) -> Message:
    """The Flower mod: the run config as data, then the site's policy, before the handler."""
    try:
        cfg = config.site_config(context.run_config, context.node_config)
    except (config.ConfigError, ValueError) as err:
        return refusal(msg, context, f"the run config: {err}")
    except Exception as err:  # noqa: BLE001 - Hydra's own errors (unknown key, bad grammar): refused, named
        return refusal(msg, context, f"the run config does not compose ({type(err).__name__})")
    try:
        policy = policy_for(context, cfg)
    except site_policy.PolicyError as err:
        return refusal(msg, context, str(err))
    problems = check_run(cfg, policy)
    if problems:
        return refusal(msg, context, "; ".join(problems))
    return call_next(msg, context)
