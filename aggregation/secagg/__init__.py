"""Secure aggregation for Message-API strategies (``aggregation=secagg``).

The server learns only the sum of the sampled sites' weighted updates and their total
weight (SecAgg, Bonawitz et al. CCS 2017, with the dropout recovery of SecAgg+, Bell et
al. CCS 2020; complete masking graph). It wraps any Message-API strategy.

The option, its two halves, the primitives below them:

* :mod:`aggregation.secagg.option`   the option: schema, capabilities, its two halves
* :mod:`aggregation.secagg.config`   ``aggregation.*`` keys and their checks
* :mod:`aggregation.secagg.strategy` coordinator half: SecAggStrategy wraps any strategy
* :mod:`aggregation.secagg.server`   SecureAggregator: runs the stages as Flower messages
* :mod:`aggregation.secagg.site`     site half: the masked reply, the stage messages, fault injection
* :mod:`aggregation.secagg.client`   the stage functions, state in ``context.state``
* :mod:`aggregation.secagg.protocol` SecAggClient / SecAggServer state machines (no transport)
* :mod:`aggregation.secagg.vector`   weighted update + weight + loss as one field vector; error bound
* :mod:`aggregation.secagg.codec`    clipping + seeded stochastic quantisation into Z_(2^k)
* :mod:`aggregation.secagg.keys`     X25519 key agreement, HKDF-SHA256 to 32-byte secrets
* :mod:`aggregation.secagg.prg`      masks from AES-256-CTR keyed with the full shared secret
* :mod:`aggregation.secagg.shamir`   Shamir sharing over GF(2^130 - 5)
* share encryption: AES-256-GCM from ``cryptography`` (:func:`aggregation.secagg.protocol.seal`)
"""
