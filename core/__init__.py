"""Shared helpers at the bottom of fedsilo's layers; they import nothing of fedsilo.

* :mod:`core.seeding`  derived seeds, CPU seeding, seeded site selection
* :mod:`core.layout`   a model's arrays as one flat vector and back
* :mod:`core.quantise` the affine quantiser both secure aggregation and Paillier packing use
* :mod:`core.sites`    a site's identity in replies (:class:`SiteId`), logs and ordering
* :mod:`core.replies`  reply error codes and the checks every reply passes before it counts
* :mod:`core.records`  the typed per-round record (participation, rejections, privacy, ...)
* :mod:`core.config`   :class:`ConfigError`, raised by every package's config validation
"""
