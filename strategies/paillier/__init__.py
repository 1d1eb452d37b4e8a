"""Paillier-encrypted aggregation (issue #5): building blocks, not yet wired into runs.

* :mod:`strategies.paillier.packing` many quantised values per plaintext, guard bits for the sum
* :mod:`strategies.paillier.vector`  a site's weighted model -> plaintexts; the sum -> FedAvg (error bound)
* :mod:`strategies.paillier.crypto`  CRT encryption with the private key, precomputable obfuscators,
  the server's homomorphic sum and ciphertext checks, a process pool for the cores
* :mod:`strategies.paillier.keys`    key files (pair for the sites, public for the server), clear errors
* ``fedsilo keys paillier --out DIR`` (:mod:`app.keys_cli`) provisions them

Not built yet: ``aggregation=paillier`` (the strategy's encrypted round flow, the ClientApp's
decrypt-train-encrypt handler, federated-only evaluation and results, the docs).
"""
