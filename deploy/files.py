"""Writing the deploy tools' files: never through a symbolic link, never over a file unasked.

Every file the deploy tools write (keys, certificates, the ``flwr`` connection config, run
configs, drill reports) goes through :func:`write_file`:

- a symbolic link at the path is refused, dangling or not, with or without ``force``: a
  link planted where a private key goes must not redirect the key elsewhere;
- a new file is created exclusively (``O_EXCL``: nothing that appeared meanwhile, a link
  included, is followed or overwritten); an existing file is replaced only with ``force``
  (the tools' ``--force``): the new one is written beside it and renamed over it, so the
  link check cannot be raced and a crash leaves the old file or the new one, never half;
- private files are created ``0600``, never readable by others, not even briefly.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["check_writable", "write_file"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def check_writable(path: Path, *, force: bool) -> None:
    """Refuse a path :func:`write_file` would refuse, before anything is written.

    Raises
    ------
    FileExistsError
        If ``path`` is a symbolic link, not a regular file, or exists without ``force``.
    """
    if path.is_symlink():
        raise FileExistsError(
            f"{path} is a symbolic link (to {os.readlink(path)}): refusing to write through "
            "it; remove the link or choose another folder"
        )
    if path.exists() and not path.is_file():
        raise FileExistsError(f"{path} exists and is not a regular file: remove it or choose "
                              "another folder")
    if path.exists() and not force:
        raise FileExistsError(
            f"{path} exists: refusing to overwrite it; pass --force (force=True) or choose "
            "another folder"
        )


def write_file(path: str | os.PathLike[str], data: bytes, *, private: bool,
               force: bool = False) -> Path:
    """Write ``data`` to ``path``; refuse symbolic links, and existing files without ``force``.

    Parameters
    ----------
    path
        The file to write; its folder must exist.
    data
        The content.
    private
        Create the file ``0600`` (keys); otherwise ``0644`` (less the umask).
    force
        Replace an existing regular file.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileExistsError
        See :func:`check_writable`; also when a file appears at ``path`` while writing
        without ``force``.

    Examples
    --------
    >>> import tempfile
    >>> p = write_file(Path(tempfile.mkdtemp()) / "a.txt", b"hi", private=False)
    >>> write_file(p, b"again", private=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileExistsError: ... exists: refusing to overwrite it; pass --force ...
    """
    path = Path(path)
    check_writable(path, force=force)
    mode = 0o600 if private else 0o644
    # O_EXCL with O_CREAT fails on any existing path, a dangling link included
    target = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp") if force else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
    except FileExistsError:
        raise FileExistsError(
            f"{path} appeared while writing it: refusing to overwrite it; pass --force "
            "(force=True) or choose another folder"
        ) from None
    done = False
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if private:
            os.chmod(target, 0o600)
        if force:
            os.replace(target, path)  # replaces a link itself, never its target
        done = True
    finally:
        if not done or force:
            target.unlink(missing_ok=True)
    return path
