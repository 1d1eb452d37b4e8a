"""Secure aggregation for Message-API strategies (issue #4), building blocks.

So far: the cryptographic and numeric primitives the protocol is made of, each tested on
its own. The four-stage protocol (advertise keys, share keys, masked input, unmask) and
its wiring into the strategies are not built yet; ``aggregation=secagg`` is not offered.

* :mod:`strategies.secagg.keys`   X25519 key agreement, HKDF-SHA256 to 32-byte secrets
* :mod:`strategies.secagg.prg`    masks from AES-256-CTR keyed with the full shared secret
* :mod:`strategies.secagg.codec`  clipping + seeded stochastic quantisation into Z_(2^k)
* Shamir secret sharing: Flower's ``flwr.common.secure_aggregation.crypto.shamir``
"""
