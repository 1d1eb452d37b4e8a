"""``aggregation=secagg`` as an option of the aggregation axis (registered in :mod:`aggregation`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy
from typing_extensions import override

from aggregation.base import AggregationOption, Capabilities, SiteHalf, SumCoordinator
from aggregation.compression import Compression
from aggregation.secagg import config
from aggregation.secagg.server import SecureAggregator
from aggregation.secagg.site import SecAggSite
from aggregation.secagg.strategy import SecAggStrategy
from aggregation.secagg.sums import SecAggSum
from core.records import RunRecord


class SecAgg(AggregationOption):
    """``aggregation=secagg``: masked updates whose masks cancel only in the sum (docs/secure-aggregation.md)."""

    name = "secagg"
    schema = config.SecAggConfig
    capabilities = Capabilities(sees_individual_updates=False, holds_plaintext_model=True)
    sees = ("only the sum of the sites' weighted updates, their total number of rows and their mean loss "
            "(secure aggregation: each update is masked, and the masks cancel only in the sum)")
    train_names = ("secagg",)
    queries = ("secagg_keys", "secagg_unmask")
    sum_message = "query.secagg_sum"
    compressions = ("none", "randk")
    compression_refusals = {
        "topk": "top-k sends the positions of each site's largest values, which reveals where its update is "
                "large; the masked sum also needs every site's values at the same positions: use randk",
        "fp16": "the masked vector holds fixed-point field elements, not floats: its resolution is "
                "aggregation.value_bits",
        "int8": "the update is already quantised to aggregation.value_bits before masking",
        "int4": "the update is already quantised to aggregation.value_bits before masking",
    }

    def site_setup(self, cfg: Any, out_dir: Path, names: list[str]) -> dict[str, dict[str, str]]:
        """Each site's identity key and one roster of them all (in a consortium each site makes its own
        key, ``fedsilo keys roster``, and the public halves are collected out of band)."""
        from core.identity import provision

        return {name: {"site-name": name, "site-key": key, "roster": roster}
                for name, (key, roster) in provision(out_dir, names).items()}

    @override
    def site_check(self, cfg: Any, node_config: dict[str, Any]) -> list[str]:
        from core.identity import IdentityError, SiteIdentity

        if "site-key" not in node_config or "roster" not in node_config:
            return ["aggregation=secagg: the site has no identity key or roster; give them with --site-key and "
                    "--roster (node config 'site-key', 'roster'), the files `fedsilo keys roster` made"]
        name = str(node_config.get("site-name") or Path(str(node_config.get("data-path", ""))).stem)
        try:
            SiteIdentity.load(name, str(node_config["site-key"]), str(node_config["roster"]))
        except (IdentityError, OSError) as err:
            return [f"aggregation=secagg: {err}"]
        return []

    @override
    def summer(self, cfg: Any, timeout: float) -> SumCoordinator:
        return SecAggSum(self.sum_message, cfg, timeout)

    @override
    def validate(self, cfg: Any, num_sites: int) -> None:
        config.validate(cfg)

    @override
    def server(self, strategy: Strategy, cfg: Any, initial: ArrayRecord, record: RunRecord) -> Strategy:
        protocol = SecureAggregator(cfg.clip, cfg.value_bits, cfg.threshold, cfg.stage_timeout, cfg.neighbours,
                                    field_bits=config.field_bits(cfg), rekey_every=cfg.rekey_every)
        return SecAggStrategy(strategy, protocol, record, Compression.of(cfg), initial)

    @override
    def site(self, cfg: Any) -> SiteHalf:
        return SecAggSite(Compression.of(cfg))
