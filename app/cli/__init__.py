"""The ``fedsilo`` command and its sub-commands (``keys``, ``certs``, ``data``, ``audit``, ``report``,
``compare``, ``deploy local``); :func:`main` is the console-script entry point."""

from app.cli.main import main

__all__ = ["main"]
