"""Learners beyond the torch rounds, each a protected-sum program (the contract: :mod:`tasks.learners`).

Importing this package registers them, at the coordinator and at every site:

* ``gbdt`` (:mod:`learners.gbdt`): histogram gradient-boosted trees;
* ``glm`` (:mod:`learners.glm`): logistic, multinomial and linear regression by federated Newton steps;
* ``auto`` (:mod:`learners.auto`): both, the lower pooled validation loss chosen.
"""

from learners import auto, gbdt, glm

__all__ = ["auto", "gbdt", "glm"]
