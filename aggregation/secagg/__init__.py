"""Secure aggregation for Message-API strategies (``aggregation=secagg``).

The server learns only the sum of the sampled sites' weighted updates and their total
weight (SecAgg, Bonawitz et al. CCS 2017, with the dropout recovery of SecAgg+, Bell et
al. CCS 2020; complete masking graph). Any strategy built on :class:`strategies.FedAvg`
(FedAvg, FedProx) composes with it.

Server half and client half, one module each, the primitives below them:

* :mod:`aggregation.secagg.server`   SecureAggregator: runs the stages as Flower messages
* :mod:`aggregation.secagg.client`   the ClientApp's stage handlers, state in ``context.state``
* :mod:`aggregation.secagg.protocol` SecAggClient / SecAggServer state machines (no transport)
* :mod:`aggregation.secagg.vector`   weighted update + weight + loss as one field vector; error bound
* :mod:`aggregation.secagg.codec`    clipping + seeded stochastic quantisation into Z_(2^k)
* :mod:`aggregation.secagg.keys`     X25519 key agreement, HKDF-SHA256 to 32-byte secrets
* :mod:`aggregation.secagg.prg`      masks from AES-256-CTR keyed with the full shared secret
* :mod:`aggregation.secagg.shamir`   Shamir sharing (pycryptodome, Flower's share format)
* share encryption: Fernet, via Flower's ``flwr.common.secure_aggregation.crypto``
"""
