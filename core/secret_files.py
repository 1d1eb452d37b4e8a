"""Files that hold a secret (private keys, a site's noise secret): written 0600, read only if private.

- :func:`write_private` writes through a temporary file in the same folder, created ``0600``
  with ``O_EXCL | O_NOFOLLOW``, then renamed over the target: an existing file of mode 0644 is
  replaced by a 0600 one (``os.open``'s mode applies only to new files, so writing *into* an old
  file would keep its mode), and a symbolic link planted at the path is replaced, never followed.
- :func:`read_private` opens with ``O_NOFOLLOW`` and refuses a file that its group or others may
  read or write, naming the file and the fix (``chmod 600``), as OpenSSH refuses a private key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class SecretFileError(ValueError):
    """A secret file that is not private to its owner, is a symbolic link, or cannot be read."""


def write_private(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` as a file only its owner can read (see module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def read_private(path: str | Path, what: str = "private key") -> bytes:
    """The bytes of a secret file, refused if it is a symbolic link or readable by group or others."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as err:
        if path.is_symlink():
            raise SecretFileError(f"{what} {path} is a symbolic link; give the file itself") from None
        raise SecretFileError(f"{what} {path} cannot be read: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise SecretFileError(f"{what} {path} is not a regular file")
        if mode & 0o077:
            raise SecretFileError(f"{what} {path} has mode {stat.S_IMODE(mode):04o}: its group or others may read it; "
                                  f"run: chmod 600 {path}")
        return f.read()
