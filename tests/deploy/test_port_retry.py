"""A SuperNode whose Runtime API port is taken before it binds is started again.

``free_port`` releases the port it found, so with many nodes (or other servers) starting
at once another process can take it first; the load test lost a node this way and waited
for it until its start-up timeout. Here the first SuperNode port is one this test holds.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import deploy.federation as federation
from deploy.federation import Federation
from deploy.processes import tagged_pids

from .test_federation import _need_flower_cli

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(300)]


def test_a_node_that_lost_its_port_starts_again_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _need_flower_cli()
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    real = federation.free_port
    handed: list[int] = []

    def first_node_gets_a_taken_port(host: str = "127.0.0.1") -> int:
        # call 1: the SuperLink; call 2: node 0's first start; then real free ports
        handed.append(port if len(handed) == 1 else real(host))
        return handed[-1]

    monkeypatch.setattr(federation, "free_port", first_node_gets_a_taken_port)
    fed = Federation(tmp_path, num_nodes=1, tls=False, auth=False)
    try:
        fed.start(timeout=180.0)
        assert handed[1] == port and len(handed) >= 3  # node 0 was given a new port
        assert fed.node_id(0) in fed.activated()
        assert fed._port_retries == {0: 1}
    finally:
        fed.stop()
        taken.close()
    assert tagged_pids(fed.tag) == []


def test_a_node_that_dies_otherwise_ends_the_wait_at_once(tmp_path: Path) -> None:
    _need_flower_cli()
    fed = Federation(tmp_path, num_nodes=1, tls=False, auth=False)
    try:
        fed.start_superlink()
        node = fed.start_supernode(0, extra_args=["--no-such-flag"])  # exits: bad argument
        node.popen.wait(timeout=60.0)
        with pytest.raises(RuntimeError, match="node-0 exited while the federation waited"):
            fed._check_supernodes(None)  # what start() runs in its wait loops
        assert fed._port_retries == {}  # not mistaken for a lost port
    finally:
        fed.stop()
