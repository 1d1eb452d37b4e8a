"""Paillier-encrypted aggregation (issue #5), building blocks: packing, keys, fast encryption."""
