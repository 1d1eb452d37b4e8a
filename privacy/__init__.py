"""Differential privacy: DP-SGD at the sites, user-level DP at the server, and an audit.

* :mod:`privacy.accountant` — a site's cumulative privacy ledger (Opacus RDP / PRV
  accountants), kept in the node's ``context.state`` across rounds;
* :mod:`privacy.clipping` — per-sample gradient clipping backends (fedsilo's fast path
  for linear models, Opacus' ``GradSampleModule`` for everything else);
* :mod:`privacy.dpsgd` — the client half: one round of DP-SGD local training;
* :mod:`privacy.central` — the server half of user-level DP (Flower's DP wrapper);
* :mod:`privacy.audit` — membership inference against a trained model.
"""
