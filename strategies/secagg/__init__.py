"""Secure aggregation for Message-API strategies (issue #4), building blocks.

So far: the cryptographic and numeric primitives, and the four-stage protocol (advertise
keys, share keys, masked input, unmask, with dropout recovery) as transport-independent
client and server state machines, tested in memory. Not built yet: carrying the stages
in Flower messages (``train.secagg_*`` handlers, state in ``context.state``), composing
with FedAvg/FedProx weighting, config and fault injection; ``aggregation=secagg`` is not
offered until then.

* :mod:`strategies.secagg.keys`   X25519 key agreement, HKDF-SHA256 to 32-byte secrets
* :mod:`strategies.secagg.prg`    masks from AES-256-CTR keyed with the full shared secret
* :mod:`strategies.secagg.codec`  clipping + seeded stochastic quantisation into Z_(2^k)
* :mod:`strategies.secagg.protocol` SecAggClient / SecAggServer, one round each
* Shamir secret sharing and Fernet share encryption: Flower's
  ``flwr.common.secure_aggregation.crypto``
"""
