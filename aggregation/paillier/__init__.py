"""Paillier-encrypted aggregation (``aggregation=paillier``; docs/paillier.md).

The sites encrypt their weighted models under a shared key pair; the server adds ciphertexts
it cannot read and never holds a trained model. The option, its two halves, the primitives
below them:

* :mod:`aggregation.paillier.option`   the option: schema, capabilities, its two halves, key checks
* :mod:`aggregation.paillier.config`   ``aggregation.*`` keys, their checks, the packing both halves use
* :mod:`aggregation.paillier.strategy` coordinator half: PaillierStrategy wraps any strategy
* :mod:`aggregation.paillier.server`  EncryptedAggregator: checks replies, multiplies ciphertexts
* :mod:`aggregation.paillier.site`    site half: decrypt, encrypt, obfuscators ahead
* :mod:`aggregation.paillier.client`  the site's primitives: decrypt the global model, encrypt its own
* :mod:`aggregation.paillier.vector`  a site's weighted model -> plaintexts; the sum -> FedAvg (error bound)
* :mod:`aggregation.paillier.packing` many quantised values per plaintext, guard bits for the sum
* :mod:`aggregation.paillier.crypto`  CRT encryption with the private key, precomputable obfuscators,
  the homomorphic sum and ciphertext checks, a process pool for the cores
* :mod:`aggregation.paillier.keys`    key files (pair for the sites, public for the server), clear errors
* ``fedsilo keys paillier --out DIR`` (:mod:`app.cli.keys`) provisions them
"""
