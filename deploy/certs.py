"""TLS certificates and SuperNode authentication keys for a Flower 1.41 deployment.

Writes, into one directory:

=================  ===========================================================
``ca.crt``         self-signed root CA (give it to every SuperNode and to ``flwr``)
``ca.key``         the CA's private key (keep it offline; it signs server certs)
``server.pem``     SuperLink certificate, SANs = localhost, 127.0.0.1 + ``--hosts``
``server.key``     SuperLink private key
``node-<i>``       SuperNode ``i`` authentication key, OpenSSH EC P-384 private key
``node-<i>.pub``   its OpenSSH public key (``ecdsa-sha2-nistp384 ...``), to register
=================  ===========================================================

Formats are the ones Flower 1.41 reads: the SuperLink loads PEM files for
``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``; ``flower-supernode
--auth-supernode-private-key`` loads an OpenSSH private key with
``load_ssh_private_key`` and requires an elliptic-curve key; ``flwr supernode register``
loads an OpenSSH public key and requires a NIST curve. These files are interchangeable
with ``openssl`` / ``ssh-keygen -t ecdsa -b 384 -N ""`` output.

Usage::

    python -m deploy.certs --out certs --hosts 127.0.0.1,localhost --nodes 3
    python -m deploy.certs --out mykey --keys-only --nodes 1   # on an edge device

Existing files are never overwritten without ``--force``, and a symbolic link where a file
goes is refused even with it (:mod:`deploy.files`): a planted link cannot redirect a key.

Keys come from the operating system's CSPRNG (through ``cryptography``), never from a
seeded generator: key material must not be reproducible.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .files import check_writable, write_file

__all__ = [
    "DEFAULT_HOSTS",
    "CertBundle",
    "main",
    "make_ca",
    "make_node_keypair",
    "make_server_cert",
    "write_bundle",
]

#: Names every SuperLink certificate carries: the ServerApp and the ``flwr`` CLI on the
#: SuperLink's own machine connect through loopback.
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")

_CURVE = ec.SECP384R1()
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertBundle:
    """Paths of the files written by :func:`write_bundle`.

    ``ca_*`` and ``server_*`` are ``None`` when only node keys were written.
    """

    out_dir: Path
    ca_cert: Path | None
    ca_key: Path | None
    server_cert: Path | None
    server_key: Path | None
    node_private_keys: tuple[Path, ...]
    node_public_keys: tuple[Path, ...]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedshield"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _check_days(days: int) -> None:
    if not isinstance(days, int) or days < 1:
        raise ValueError(f"certificate validity must be >= 1 day, got days={days!r}")


def _san_entry(host: str) -> x509.GeneralName:
    """Return the SAN for ``host``: an ``IPAddress`` for IP literals, else a ``DNSName``.

    Raises
    ------
    ValueError
        If ``host`` is empty, contains whitespace, a scheme or a port.
    """
    if not host or host != host.strip() or any(c.isspace() for c in host):
        raise ValueError(f"host must be a bare name or IP address, got {host!r}")
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if "/" in host or ":" in host:
        raise ValueError(
            f"host must be a bare name or IP address without scheme or port, got {host!r}: "
            "write 'superlink.example.org', not 'https://superlink.example.org:9092'"
        )
    return x509.DNSName(host)


def make_ca(
    *, common_name: str = "fedshield root CA", days: int = 365
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a self-signed root certificate authority (RFC 5280, section 4.2.1.9).

    The CA is an EC P-384 key whose certificate carries ``BasicConstraints(ca=True,
    path_length=0)`` and ``KeyUsage(key_cert_sign, crl_sign)``: it may sign leaf
    certificates only.

    Parameters
    ----------
    common_name
        Subject and issuer common name.
    days
        Validity in days, counted from five minutes ago (clock skew).

    Returns
    -------
    tuple[EllipticCurvePrivateKey, Certificate]
        The CA key and its self-signed certificate.

    Raises
    ------
    ValueError
        If ``days < 1``.

    Examples
    --------
    >>> key, cert = make_ca(days=1)
    >>> cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    True
    """
    _check_days(days)
    key = ec.generate_private_key(_CURVE)
    now = dt.datetime.now(dt.UTC)
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str] = (),
    *,
    days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create the SuperLink's TLS server certificate, signed by the CA.

    The subject alternative names are ``DEFAULT_HOSTS`` followed by ``hosts`` (duplicates
    removed, order kept); IP literals become ``IPAddress`` entries, names ``DNSName``
    entries, because TLS clients match the address they dial against the SANs only
    (RFC 6125, section 6.4.4), never the common name.

    Parameters
    ----------
    ca_key, ca_cert
        The signing CA from :func:`make_ca`.
    hosts
        Extra names or IP addresses under which SuperNodes reach the SuperLink.
    days
        Validity in days.

    Returns
    -------
    tuple[EllipticCurvePrivateKey, Certificate]
        The server key and certificate (``ExtendedKeyUsage = serverAuth``).

    Raises
    ------
    ValueError
        If a host is malformed (has a scheme, a port or whitespace) or ``days < 1``.

    Examples
    --------
    >>> ca_key, ca_cert = make_ca(days=1)
    >>> _, cert = make_server_cert(ca_key, ca_cert, ["10.0.0.5"], days=1)
    >>> san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    >>> [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    ['127.0.0.1', '10.0.0.5']
    """
    _check_days(days)
    all_hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    sans = [_san_entry(h) for h in all_hosts]
    key = ec.generate_private_key(_CURVE)
    now = dt.datetime.now(dt.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(all_hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_keypair(comment: str = "") -> tuple[bytes, bytes]:
    """Create a SuperNode authentication key pair (ECDSA over NIST P-384).

    Flower 1.41 SuperNodes sign each Fleet API request with this key (ECDSA-signed
    timestamps); the SuperLink, run with ``--enable-supernode-auth``, accepts only nodes
    whose public key was registered with ``flwr supernode register``.

    Parameters
    ----------
    comment
        Text appended to the public key line (e.g. ``"node-0"``); must not contain a
        newline.

    Returns
    -------
    tuple[bytes, bytes]
        ``(private, public)``: an unencrypted OpenSSH private key (``-----BEGIN OPENSSH
        PRIVATE KEY-----``) and a one-line OpenSSH public key (``ecdsa-sha2-nistp384 AAAA...
        [comment]\\n``).

    Raises
    ------
    ValueError
        If ``comment`` contains a line break.

    Examples
    --------
    >>> private, public = make_node_keypair("node-0")
    >>> public.split()[0], public.split()[2]
    (b'ecdsa-sha2-nistp384', b'node-0')
    """
    if "\n" in comment or "\r" in comment:
        raise ValueError(f"key comment must be one line, got {comment!r}")
    key = ec.generate_private_key(_CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    if comment:
        public += b" " + comment.encode()
    return private, public + b"\n"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_bundle(
    out_dir: str | os.PathLike[str],
    *,
    hosts: Sequence[str] = (),
    nodes: int = 0,
    days: int = 365,
    keys_only: bool = False,
    node_prefix: str = "node",
    overwrite: bool = False,
) -> CertBundle:
    """Write a CA, a SuperLink certificate and ``nodes`` SuperNode key pairs.

    Parameters
    ----------
    out_dir
        Directory to write into (created if missing).
    hosts
        Extra SAN entries for the SuperLink certificate (see :func:`make_server_cert`).
    nodes
        Number of SuperNode key pairs ``<node_prefix>-<i>`` / ``.pub``, ``i = 0..nodes-1``.
    days
        Certificate validity in days.
    keys_only
        Write only the node key pairs (on an edge device that keeps its private key).
    node_prefix
        File name prefix of the node keys.
    overwrite
        Replace existing regular files instead of raising (``--force``). A symbolic link
        at a file's path is refused either way: key material is never written through one.

    Returns
    -------
    CertBundle
        The paths written.

    Raises
    ------
    ValueError
        If ``nodes < 0``, ``keys_only`` with ``nodes == 0``, a malformed host or prefix.
    FileExistsError
        If a file exists and ``overwrite`` is false, or a path is a symbolic link or a
        folder (no file is written in these cases).

    Examples
    --------
    >>> import tempfile
    >>> b = write_bundle(tempfile.mkdtemp(), nodes=2, days=1)
    >>> [p.name for p in b.node_public_keys]
    ['node-0.pub', 'node-1.pub']
    """
    if not isinstance(nodes, int) or nodes < 0:
        raise ValueError(f"nodes must be an integer >= 0, got nodes={nodes!r}")
    if keys_only and nodes == 0:
        raise ValueError("keys_only writes node keys only, so it needs nodes >= 1, got 0")
    if not node_prefix or any(c in node_prefix for c in "/\\ \n"):
        raise ValueError(f"node_prefix must be a plain file name, got {node_prefix!r}")
    _check_days(days)
    for h in hosts:
        _san_entry(h)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    names = [] if keys_only else ["ca.crt", "ca.key", "server.pem", "server.key"]
    for i in range(nodes):
        names += [f"{node_prefix}-{i}", f"{node_prefix}-{i}.pub"]
    links = [n for n in names if (out / n).is_symlink()]
    if links:
        raise FileExistsError(
            f"{out} holds symbolic links at {', '.join(links)}: refusing to write key material "
            "through them (even with --force); remove the links or choose another --out "
            "directory"
        )
    clash = [n for n in names if (out / n).exists()]
    if clash and not overwrite:
        raise FileExistsError(
            f"{out} already holds {', '.join(clash)}: refusing to overwrite key material; "
            "pass overwrite=True (--force) or choose another --out directory"
        )
    for n in names:
        check_writable(out / n, force=overwrite)  # e.g. a folder where a key goes

    def write(name: str, data: bytes, *, private: bool) -> Path:
        return write_file(out / name, data, private=private, force=overwrite)

    ca_cert_p = ca_key_p = srv_cert_p = srv_key_p = None
    if not keys_only:
        ca_key, ca_cert = make_ca(days=days)
        srv_key, srv_cert = make_server_cert(ca_key, ca_cert, hosts, days=days)
        pem = serialization.Encoding.PEM
        ca_cert_p = write("ca.crt", ca_cert.public_bytes(pem), private=False)
        ca_key_p = write("ca.key", _pem_key(ca_key), private=True)
        srv_cert_p = write("server.pem", srv_cert.public_bytes(pem), private=False)
        srv_key_p = write("server.key", _pem_key(srv_key), private=True)
    privs: list[Path] = []
    pubs: list[Path] = []
    for i in range(nodes):
        private, public = make_node_keypair(f"{node_prefix}-{i}")
        privs.append(write(f"{node_prefix}-{i}", private, private=True))
        pubs.append(write(f"{node_prefix}-{i}.pub", public, private=False))
    return CertBundle(out, ca_cert_p, ca_key_p, srv_cert_p, srv_key_p, tuple(privs),
                      tuple(pubs))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deploy.certs",
        description="Write a CA, a SuperLink TLS certificate and SuperNode auth keys.",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--hosts",
        default="",
        help="comma-separated extra SAN names/IPs of the SuperLink "
        "(localhost and 127.0.0.1 are always included)",
    )
    p.add_argument("--nodes", type=int, default=0, help="number of SuperNode key pairs")
    p.add_argument("--days", type=int, default=365, help="certificate validity (days)")
    p.add_argument("--node-prefix", default="node", help="file name prefix of node keys")
    p.add_argument("--keys-only", action="store_true",
                   help="write only node key pairs (no CA, no server certificate)")
    p.add_argument("--force", action="store_true",
                   help="overwrite existing files (symbolic links are refused even then)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status.

    Examples
    --------
    >>> import tempfile
    >>> main(["--out", tempfile.mkdtemp(), "--nodes", "1", "--days", "1"])  # doctest: +ELLIPSIS
    wrote ...
    0
    """
    args = _parser().parse_args(argv)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    try:
        bundle = write_bundle(
            args.out,
            hosts=hosts,
            nodes=args.nodes,
            days=args.days,
            keys_only=args.keys_only,
            node_prefix=args.node_prefix,
            overwrite=args.force,
        )
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    written = [bundle.ca_cert, bundle.ca_key, bundle.server_cert, bundle.server_key]
    written_paths = [p for p in written if p is not None]
    written_paths += [*bundle.node_private_keys, *bundle.node_public_keys]
    print("wrote " + " ".join(str(p) for p in written_paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
