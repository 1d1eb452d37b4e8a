"""The compression setting (``aggregation.compress``, ``keep``, ``keep_bits``, ``error_feedback``), the record keys of a
compressed reply, and which aggregation option takes which method (:func:`check`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aggregation.base import AggregationOption
from core.config import check as check_key

METHODS = ("none", "fp16", "int8", "int4", "topk", "randk")


KEEP_BITS = (8, 16, 32)


#: the reply's compressed update (raw arrays) and its description
UPDATE_KEY = "fedsilo-update"


META_KEY = "fedsilo-compression"


#: the train config key naming the global model a compressed update is relative to
BASE_KEY = "compress-base"


#: the train config key carrying the ``randk`` positions' seed for that global model
SEED_KEY = "compress-seed"


STYPE = "fedsilo.raw"


RESIDUAL = "residual"


@dataclass(frozen=True)
class Compression:
    """One compression setting (from ``aggregation.compress``, ``keep``, ``keep_bits``, ``error_feedback``)."""

    method: str = "none"
    keep: float = 0.01
    keep_bits: int = 8
    error_feedback: bool = True

    @classmethod
    def of(cls, cfg: Any) -> Compression:
        """The setting of an ``aggregation`` config (its ``compress``, ``keep``, ``keep_bits``, ``error_feedback``)."""
        return cls(str(getattr(cfg, "compress", "none")), float(getattr(cfg, "keep", 0.01)),
                   int(getattr(cfg, "keep_bits", 8)), bool(getattr(cfg, "error_feedback", True)))

    @property
    def active(self) -> bool:
        """Whether updates are compressed at all (any method but ``none``)."""
        return self.method != "none"

    def kept(self, n: int) -> int:
        """Values a sparse method sends out of ``n``."""
        return max(1, min(n, int(round(self.keep * n))))

    def to_record(self) -> dict[str, Any]:
        """The setting as the reply's description record carries it."""
        return {"method": self.method, "keep": self.keep, "bits": self.keep_bits, "ef": self.error_feedback}


def check(option: AggregationOption, cfg: Any) -> None:
    """Range checks of the compression keys, and whether ``option`` takes ``cfg.compress``
    (its ``compressions``; the reason it refuses the others is in the error)."""
    method = str(getattr(cfg, "compress", "none"))
    check_key(method in METHODS, "aggregation.compress", method, f"one of {list(METHODS)}")
    why = option.compression_refusals.get(method, "")
    check_key(method in option.compressions, "aggregation.compress", method,
              f"one of {list(option.compressions)} with aggregation={option.name}" + (f" ({why})" if why else ""))
    check_key(0 < float(getattr(cfg, "keep", 0.01)) <= 1, "aggregation.keep", getattr(cfg, "keep", None),
              "a share 0 < keep <= 1 of the update's values")
    check_key(int(getattr(cfg, "keep_bits", 8)) in KEEP_BITS, "aggregation.keep_bits", getattr(cfg, "keep_bits", None),
              f"one of {list(KEEP_BITS)}")
