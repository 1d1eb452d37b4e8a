"""``python -m app.cli``: the ``fedsilo`` command."""

from app.cli.main import main

main()
