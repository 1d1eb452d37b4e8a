"""Put this folder first on PYTHONPATH and the interpreter behaves as if no optional extra were installed.

Every top-level module of ``core.extras.EXTRAS`` (and the benchmark-only ones) is marked absent
(``None`` in ``sys.modules``): ``import phe`` raises ModuleNotFoundError and
``importlib.util.find_spec("phe")`` returns None, as on a machine where ``pip install fedsilo`` ran
without extras. ``tests/unit/test_extras.py`` runs fedsilo's imports, config checks and commands
under it; ``.ci/wheel`` checks the same with a real install.
"""

import sys

BLOCKED = ("phe", "gmpy2", "tensorboard", "mlflow", "tenseal")

for _name in BLOCKED:
    sys.modules[_name] = None  # type: ignore[assignment]
