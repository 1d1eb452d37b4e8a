"""The ``fedsilo`` command and its sub-commands (``keys``, ``certs``, ``data``, ``audit``, ``report``,
``compare``, ``deploy local``); :func:`app.cli.main.main` is the console-script entry point."""
