"""``aggregation=paillier`` as an option of the aggregation axis (registered in :mod:`aggregation`).

phe (GPL-3.0) is an optional extra: the coordinator and site halves import it only when
the option is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy
from typing_extensions import override

from aggregation.base import AggregationOption, Capabilities, SiteHalf, SumCoordinator
from aggregation.paillier import config
from aggregation.paillier.config import NODE_CONFIG_KEY
from core import extras
from core.records import RunRecord


def _missing_public_key() -> str:
    return ("aggregation=paillier needs aggregation.public_key=PATH (the server gets the public key only; "
            "make the files with: fedsilo keys paillier --out DIR)")


class Paillier(AggregationOption):
    """``aggregation=paillier``: the sites' weighted models summed as ciphertexts under a key the coordinator does not hold."""

    name = "paillier"
    schema = config.PaillierConfig
    capabilities = Capabilities(sees_individual_updates=False, holds_plaintext_model=False)
    sees = ("only ciphertexts: the sites' weighted models encrypted under a key the server does not hold; "
            "it never has a trained model in the clear")

    sum_message = "query.paillier_sum"
    queries = ("paillier_reveal", "paillier_decrypt")
    _models = ("sites encrypt their weighted models, not updates: fewer bits per value is "
               "aggregation.value_bits (more values per ciphertext)")
    compression_refusals = {
        "topk": "top-k sends the positions of each site's largest values, which reveals where its update is "
                "large, and encrypted sums need every site's values at the same positions",
        "randk": _models, "fp16": _models, "int8": _models, "int4": _models,
    }

    @override
    def validate(self, cfg: Any, num_sites: int) -> None:
        config.validate(cfg, num_sites)

    @override
    def summer(self, cfg: Any, timeout: float) -> SumCoordinator:
        from aggregation.paillier.sums import PaillierSum

        return PaillierSum(self.sum_message, cfg, timeout)

    def preflight(self, cfg: Any) -> None:
        """The optional extra is installed; the public key (and, in simulation, the sites' key pair)
        can be read, are at least 2048 bits, and are one pair."""
        if (why := extras.message("aggregation=paillier", "paillier")) is not None:
            raise ValueError(why)
        from aggregation.paillier.keys import PaillierKeyError, check_pair, load_private, load_public

        try:
            if not cfg.public_key:
                raise PaillierKeyError(_missing_public_key())
            public = load_public(Path(cfg.public_key))
            if cfg.keypair:
                check_pair(public, load_private(Path(cfg.keypair)), Path(cfg.public_key), Path(cfg.keypair))
        except PaillierKeyError as err:
            raise ValueError(str(err)) from err

    @override
    def node_config(self, cfg: Any) -> dict[str, str]:
        return {NODE_CONFIG_KEY: str(Path(cfg.keypair).resolve())} if cfg.keypair else {}

    def simulation_setup(self, cfg: Any, out_dir: Path) -> tuple[list[str], str]:
        """No key files at all: a fresh key pair for this simulated run, in its output folder."""
        if cfg.public_key or cfg.keypair:
            return [], ""
        if extras.missing("paillier"):  # preflight names the missing extra
            return [], ""
        from aggregation.paillier.keys import generate

        private, public = generate(out_dir / "paillier-keys")
        return ([f"aggregation.public_key={public}", f"aggregation.keypair={private}"],
                f"aggregation=paillier: no key files given, so this simulated run made a temporary key pair in "
                f"{private.parent} (a deployment needs the consortium's keys: fedsilo keys paillier --out DIR)")

    @override
    def site_check(self, cfg: Any, node_config: dict[str, Any]) -> list[str]:
        if (why := extras.message("aggregation=paillier", "paillier")) is not None:
            return [why]
        from aggregation.paillier.keys import PaillierKeyError, load_private

        path = str(node_config.get(NODE_CONFIG_KEY, "") or "")
        if not path:
            return [f"aggregation=paillier: the site has no Paillier key pair; give it with --paillier-keypair "
                    f"(node config '{NODE_CONFIG_KEY}'), the file the consortium's `fedsilo keys paillier` made"]
        try:
            load_private(Path(path))
        except (PaillierKeyError, OSError, ValueError) as err:
            return [f"aggregation=paillier: the key pair {path} cannot be used: {err}"]
        return []

    @override
    def server(self, strategy: Strategy, cfg: Any, initial: ArrayRecord, record: RunRecord) -> Strategy:
        from aggregation.paillier.keys import PaillierKeyError, load_public
        from aggregation.paillier.server import EncryptedAggregator, ct_width
        from aggregation.paillier.split import SplitDecryption
        from aggregation.paillier.strategy import PaillierStrategy

        if not cfg.public_key:
            raise PaillierKeyError(_missing_public_key())
        public = load_public(cfg.public_key)
        aggregator = EncryptedAggregator(public, config.packer_for(cfg, public.n.bit_length()))
        split = (SplitDecryption(ct_width(public), public.n, cfg.stage_timeout) if cfg.decryption == "split" else None)
        return PaillierStrategy(strategy, aggregator, initial, record, split)

    @override
    def site(self, cfg: Any) -> SiteHalf:
        from aggregation.paillier.site import PaillierSite

        return PaillierSite(cfg)
