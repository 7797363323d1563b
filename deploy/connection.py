"""Add a SuperLink connection to the ``flwr`` CLI's ``$FLWR_HOME/config.toml``.

Flower 1.41 keeps connections in ``$FLWR_HOME/config.toml`` (default ``~/.flwr``)::

    [superlink]
    default = "fedshield"

    [superlink.fedshield]
    address = "superlink.example.org:9093"
    root-certificates = "/abs/path/ca.crt"

after which ``flwr run . fedshield``, ``flwr supernode register key.pub fedshield`` and
``flwr list fedshield`` talk HTTPS to that SuperLink and trust only that CA. Other
connections in the file are kept; a connection of the same name with other settings is
replaced only with ``--force``, and a ``config.toml`` that is a symbolic link is refused.

Usage::

    python -m deploy.connection --name fedshield --address 10.0.0.5:9093 --ca certs/ca.crt
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w

from .files import check_writable, write_file

__all__ = ["flwr_home", "main", "write_connection"]


def flwr_home() -> Path:
    """The ``flwr`` CLI's home: ``$FLWR_HOME``, else ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME", "~/.flwr")).expanduser()


def write_connection(
    home: Path,
    name: str,
    address: str,
    *,
    root_certificates: Path | None,
    insecure: bool = False,
    make_default: bool = True,
    force: bool = False,
) -> Path:
    """Add connection ``name`` to ``home/config.toml``, keeping the others.

    Parameters
    ----------
    home
        The ``FLWR_HOME`` directory of the ``flwr`` CLI user.
    name
        Connection name, used as ``flwr run . <name>``.
    address
        SuperLink ``host:port`` (Control API; the same port as Fleet in 1.41).
    root_certificates
        CA certificate that signed the SuperLink certificate (stored as an absolute path,
        as Flower requires); ``None`` only with ``insecure``.
    insecure
        Plain HTTP (no TLS).
    make_default
        Make it the default connection.
    force
        Replace a connection ``name`` that exists with other settings.

    Returns
    -------
    Path
        The written ``config.toml``.

    Raises
    ------
    ValueError
        If neither or both of ``root_certificates`` and ``insecure`` are given, the name is
        not ``[A-Za-z0-9_-]+``, or the address has a scheme.
    FileNotFoundError
        If ``root_certificates`` does not exist.
    FileExistsError
        If connection ``name`` exists with other settings and ``force`` is false, or
        ``config.toml`` is a symbolic link or not a regular file.

    Examples
    --------
    >>> import tempfile
    >>> p = write_connection(Path(tempfile.mkdtemp()), "lab", "127.0.0.1:9093",
    ...                      root_certificates=None, insecure=True)
    >>> print(p.read_text())
    [superlink]
    default = "lab"
    <BLANKLINE>
    [superlink.lab]
    address = "127.0.0.1:9093"
    insecure = true
    <BLANKLINE>
    """
    if (root_certificates is None) != insecure:
        raise ValueError(
            "a connection needs exactly one of root_certificates (TLS) or insecure=True, "
            f"got root_certificates={root_certificates}, insecure={insecure}"
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name == "default":
        raise ValueError(f"connection name must match [A-Za-z0-9_-]+ (not 'default'), got {name!r}")
    if "://" in address:
        raise ValueError(f"address is host:port without a scheme, got {address!r}")
    conn: dict[str, Any] = {"address": address}
    if root_certificates is not None:
        ca = Path(root_certificates).expanduser().resolve()
        if not ca.is_file():
            raise FileNotFoundError(f"root certificate {ca} does not exist")
        conn["root-certificates"] = str(ca)
    else:
        conn["insecure"] = True
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    check_writable(path, force=True)  # a link or a folder is refused
    config: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    superlink = config.setdefault("superlink", {})
    if superlink.get(name, conn) != conn and not force:
        raise FileExistsError(
            f"{path} already has a connection {name!r} with other settings "
            f"({superlink[name]}): refusing to replace it; pass --force (force=True) or "
            "choose another --name"
        )
    superlink[name] = conn
    if make_default or "default" not in superlink:
        superlink["default"] = name
    # `default` first, as Flower writes it
    config["superlink"] = {"default": superlink.pop("default"), **superlink}
    # the whole file is rewritten, every other connection kept
    private = path.exists() and not path.stat().st_mode & 0o077  # owner-only stays so
    write_file(path, tomli_w.dumps(config).encode(), private=private, force=True)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    p = argparse.ArgumentParser(prog="python -m deploy.connection",
                                description="Add a SuperLink connection for the flwr CLI.")
    p.add_argument("--name", default="fedshield", help="connection name")
    p.add_argument("--address", required=True, help="SuperLink host:port")
    p.add_argument("--ca", help="root CA certificate (TLS)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (NOT for real data)")
    p.add_argument("--flwr-home", help="default: $FLWR_HOME or ~/.flwr")
    p.add_argument("--no-default", action="store_true", help="do not make it the default")
    p.add_argument("--force", action="store_true",
                   help="replace a connection of the same name that has other settings")
    args = p.parse_args(argv)
    if args.insecure:
        print("WARNING: insecure connection: traffic to the SuperLink is not encrypted",
              file=sys.stderr)
    try:
        path = write_connection(
            Path(args.flwr_home).expanduser() if args.flwr_home else flwr_home(),
            args.name,
            args.address,
            root_certificates=Path(args.ca) if args.ca else None,
            insecure=args.insecure,
            make_default=not args.no_default,
            force=args.force,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote connection {args.name!r} to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
