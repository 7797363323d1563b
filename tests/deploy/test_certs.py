"""Certificates, keys, connections and node configs are what Flower 1.41 accepts.

Fast (no Flower processes): a TLS handshake in memory with Python's ``ssl``, Flower's own
key loaders and config parsers as oracles.
"""

from __future__ import annotations

import ssl
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy import connection
from deploy.certs import DEFAULT_HOSTS, CertBundle, main, make_node_keypair, write_bundle
from deploy.connection import write_connection
from deploy.federation import Federation, format_node_config
from deploy.files import write_file


def _some(path: Path | None) -> Path:
    assert path is not None
    return path


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> None:
    """Run a TLS handshake between the two contexts through memory buffers."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    done = {"srv": False, "cli": False}
    for _ in range(50):
        for name, end in (("cli", cli), ("srv", srv)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> CertBundle:
    return write_bundle(tmp_path_factory.mktemp("certs"), hosts=["10.1.2.3", "link.example"],
                        nodes=2, days=2)


def _server_ctx(bundle: CertBundle) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(_some(bundle.server_cert), _some(bundle.server_key))
    return ctx


def test_server_certificate_names_every_host(bundle: CertBundle) -> None:
    cert = x509.load_pem_x509_certificate(_some(bundle.server_cert).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert set(dns) == {"localhost", "link.example"}
    assert set(ips) == {"127.0.0.1", "10.1.2.3"}
    assert set(DEFAULT_HOSTS) <= set(dns) | set(ips)
    ca = x509.load_pem_x509_certificate(_some(bundle.ca_cert).read_bytes())
    cert.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "10.1.2.3", "link.example"])
def test_tls_handshake_verifies_with_the_ca(bundle: CertBundle, host: str) -> None:
    client = ssl.create_default_context(cafile=str(bundle.ca_cert))
    _handshake(_server_ctx(bundle), client, host)


def test_tls_handshake_fails_for_other_names_and_other_cas(bundle: CertBundle, tmp_path: Path) -> None:
    client = ssl.create_default_context(cafile=str(bundle.ca_cert))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(_server_ctx(bundle), client, "10.9.9.9")
    other = write_bundle(tmp_path, days=1)
    stranger = ssl.create_default_context(cafile=str(other.ca_cert))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(_server_ctx(bundle), stranger, "localhost")


def test_node_keys_load_with_flowers_loaders(bundle: CertBundle) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    for priv_path, pub_path in zip(bundle.node_private_keys, bundle.node_public_keys, strict=True):
        # exactly what flower-supernode --auth-supernode-private-key does
        key = serialization.load_ssh_private_key(priv_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp384r1"
        # exactly what `flwr supernode register` does; the pair must match
        assert try_load_public_key(pub_path) == public_key_to_bytes(key.public_key())


def test_keys_are_distinct_and_private_files_are_owner_only(bundle: CertBundle) -> None:
    pubs = {p.read_bytes().split()[1] for p in bundle.node_public_keys}
    assert len(pubs) == len(bundle.node_public_keys)
    for path in [_some(bundle.ca_key), _some(bundle.server_key), *bundle.node_private_keys]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_existing_key_material_is_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_bundle(tmp_path, nodes=1, days=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_bundle(tmp_path, nodes=2, days=1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert main(["--out", str(tmp_path), "--nodes", "1"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    write_bundle(tmp_path, nodes=1, days=1, overwrite=True)
    assert (tmp_path / "ca.crt").read_bytes() != before["ca.crt"]


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("name", ["ca.key", "server.key", "node-0", "ca.crt"])
def test_a_symlink_where_a_file_goes_is_refused_even_with_force(
    tmp_path: Path, name: str, force: bool
) -> None:
    out, elsewhere = tmp_path / "certs", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / name).symlink_to(elsewhere / "stolen")  # dangling: the target does not exist
    with pytest.raises(FileExistsError, match=f"symbolic links at {name}"):
        write_bundle(out, nodes=1, days=1, overwrite=force)
    assert list(elsewhere.iterdir()) == []  # nothing written through the link
    assert [p.name for p in out.iterdir()] == [name]  # nor anything else
    (elsewhere / "stolen").write_bytes(b"victim")  # a link to an existing file: same
    with pytest.raises(FileExistsError, match="symbolic link"):
        write_bundle(out, nodes=1, days=1, overwrite=force)
    assert (elsewhere / "stolen").read_bytes() == b"victim"


def test_the_cli_refuses_a_symlink_and_overwrites_only_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--out", str(tmp_path), "--nodes", "1", "--days", "1"]) == 0
    key = (tmp_path / "node-0").read_bytes()
    assert main(["--out", str(tmp_path), "--nodes", "1", "--days", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "node-0").read_bytes() == key
    assert main(["--out", str(tmp_path), "--nodes", "1", "--days", "1", "--force"]) == 0
    assert (tmp_path / "node-0").read_bytes() != key
    assert stat.S_IMODE((tmp_path / "node-0").stat().st_mode) == 0o600
    (tmp_path / "server.key").unlink()
    (tmp_path / "server.key").symlink_to(tmp_path / "nowhere")
    assert main(["--out", str(tmp_path), "--days", "1", "--force"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_write_file_creates_exclusively_and_replaces_only_with_force(tmp_path: Path) -> None:
    path = write_file(tmp_path / "k", b"one", private=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_file(path, b"two", private=True)
    assert path.read_bytes() == b"one"
    write_file(path, b"two", private=True, force=True)
    assert path.read_bytes() == b"two"
    (tmp_path / "dir").mkdir()
    with pytest.raises(FileExistsError, match="not a regular file"):
        write_file(tmp_path / "dir", b"x", private=False, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "k"]  # no temporaries


def test_connection_refuses_a_symlinked_config_and_keeps_an_owner_only_one(
    tmp_path: Path,
) -> None:
    real = tmp_path / "dotfiles.toml"
    real.write_text("")
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").symlink_to(real)
    with pytest.raises(FileExistsError, match="symbolic link"):
        write_connection(home, "lab", "h:1", root_certificates=None, insecure=True)
    assert real.read_text() == ""
    (home / "config.toml").unlink()
    (home / "config.toml").write_text("")
    (home / "config.toml").chmod(0o600)
    write_connection(home, "lab", "h:1", root_certificates=None, insecure=True)
    assert stat.S_IMODE((home / "config.toml").stat().st_mode) == 0o600
    assert connection.main(["--flwr-home", str(home), "--name", "lab", "--address", "h:2",
                            "--insecure"]) == 2
    assert connection.main(["--flwr-home", str(home), "--name", "lab", "--address", "h:2",
                            "--insecure", "--force"]) == 0


def test_a_federation_never_replaces_earlier_keys_without_force(tmp_path: Path) -> None:
    first = Federation(tmp_path, num_nodes=1)
    assert first.certs is not None and first.certs.ca_key is not None
    key = first.certs.ca_key.read_bytes()
    with pytest.raises(FileExistsError, match="earlier federation's keys: pass --force"):
        Federation(tmp_path, num_nodes=1)
    assert first.certs.ca_key.read_bytes() == key
    Federation(tmp_path, num_nodes=1, force=True)
    assert first.certs.ca_key.read_bytes() != key


def test_fault_drills_refuse_a_workdir_with_earlier_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deploy import faults

    (tmp_path / "out-resume").mkdir()
    (tmp_path / "out-resume" / "metrics.jsonl").write_text('{"round": 0}\n')
    assert faults.main(["--workdir", str(tmp_path), "--drill", "resume"]) == 2
    err = capsys.readouterr().err
    assert "out-resume" in err and "--force" in err
    assert (tmp_path / "out-resume" / "metrics.jsonl").exists()
    assert not (tmp_path / "federation").exists()  # nothing started


@pytest.mark.parametrize("host", ["https://x.org", "x.org:9093", "a b", ""])
def test_malformed_hosts_are_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="host"):
        write_bundle(tmp_path, hosts=[host], days=1)
    assert list(tmp_path.iterdir()) == []


def test_keys_only_writes_no_ca(tmp_path: Path) -> None:
    b = write_bundle(tmp_path, nodes=1, keys_only=True, node_prefix="edge")
    assert b.ca_cert is None and b.server_cert is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge-0", "edge-0.pub"]
    with pytest.raises(ValueError, match="nodes >= 1"):
        write_bundle(tmp_path / "x", keys_only=True)


def test_node_keypair_comment() -> None:
    private, public = make_node_keypair("node-7")
    assert public.endswith(b" node-7\n")
    with pytest.raises(ValueError, match="one line"):
        make_node_keypair("a\nb")
    assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")


def test_connection_is_what_flower_parses_and_keeps_others(bundle: CertBundle, tmp_path: Path) -> None:
    from flwr.cli.flower_config import parse_superlink_connection

    (tmp_path / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    path = write_connection(tmp_path, "lab", "127.0.0.1:9093",
                            root_certificates=bundle.ca_cert, make_default=False)
    config = tomllib.loads(path.read_text())
    assert config["superlink"]["default"] == "local"
    assert config["superlink"]["local"] == {"address": ":local:"}
    conn = parse_superlink_connection(config["superlink"]["lab"], "lab")
    assert conn.address == "127.0.0.1:9093"
    assert conn.root_certificates == str(_some(bundle.ca_cert).resolve())
    assert conn.insecure is False
    with pytest.raises(FileExistsError, match="connection 'lab' with other settings.*--force"):
        write_connection(tmp_path, "lab", "127.0.0.1:9094", root_certificates=None,
                         insecure=True)
    assert tomllib.loads(path.read_text()) == config
    write_connection(tmp_path, "lab", "127.0.0.1:9094", root_certificates=None, insecure=True,
                     force=True)
    config = tomllib.loads(path.read_text())
    assert config["superlink"]["default"] == "lab"
    assert parse_superlink_connection(config["superlink"]["lab"], "lab").insecure is True


def test_connection_refuses_ambiguous_security(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        write_connection(tmp_path, "x", "h:1", root_certificates=None)
    with pytest.raises(ValueError, match="exactly one"):
        write_connection(tmp_path, "x", "h:1", root_certificates=tmp_path, insecure=True)
    with pytest.raises(ValueError, match="scheme"):
        write_connection(tmp_path, "x", "https://h:1", root_certificates=None, insecure=True)
    assert not (tmp_path / "config.toml").exists()


_text = st.text(
    st.characters(blacklist_characters='"', blacklist_categories=("Cc", "Cs")), max_size=20
)
_value = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    _text,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True), _value,
                       max_size=5))
def test_node_config_round_trips_through_flowers_parser(
    config: dict[str, bool | int | float | str],
) -> None:
    from flwr.common.config import parse_config_args

    assert parse_config_args([format_node_config(config)]) == config


@pytest.mark.parametrize("bad", ['say "hi"', "line\nbreak", "tab\there"])
def test_node_config_refuses_unrepresentable_strings(bad: str) -> None:
    with pytest.raises(ValueError, match="double quotes or control"):
        format_node_config({"k": bad})
