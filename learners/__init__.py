"""Learners beyond the torch rounds, each a protected-sum program (the contract: :mod:`tasks.learners`).

Importing this package registers them, at the coordinator and at every site:

* ``gbdt`` (:mod:`learners.gbdt`): histogram gradient-boosted trees;
* ``glm`` (:mod:`learners.glm`): logistic, multinomial and linear regression by federated Newton steps;
* ``auto`` (:mod:`learners.auto`): both, the lower pooled validation loss chosen (a survival label: ``survival``);
* ``survival`` (:mod:`learners.survival`): Kaplan-Meier, Nelson-Aalen, log-rank and Cox across sites;
* ``table1`` (:mod:`learners.table1`, ``fedsilo stats``): a clinical Table 1 with the sites' disclosure control.
"""

from learners import auto, gbdt, glm, survival, table1

__all__ = ["auto", "gbdt", "glm", "survival", "table1"]
