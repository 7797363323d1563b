"""Secure aggregation: SecAgg+ [Bell et al., CCS 2020] with dropouts, masks from the full
key, an optional hybrid X25519 + ML-KEM-768 key agreement, and distributed DP.

A base package (beside :mod:`aggregation` and :mod:`privacy`): numpy, ``cryptography``,
no Flower, no server or client. The round component is :mod:`server.secagg`, the client's
handler :mod:`client.secagg`; ``docs/secagg.md`` states the threat model.

========================================  ==================================================
:mod:`secagg.quantise`                    clipped, weighted updates to ``Z_{2^k}`` and back;
                                          the error bound
:mod:`secagg.crypto`                      HKDF, ChaCha20 mask streams, ChaCha20-Poly1305,
                                          X25519, ML-KEM-768
:mod:`secagg.shamir`                      Shamir sharing over ``GF(2^256 + 297)``
:mod:`secagg.graph`                       the neighbour graph and the threshold
:mod:`secagg.protocol`                    the client and server state machines
:mod:`secagg.ddp`                         distributed DP: the clients' discrete Gaussian
                                          noise on the quantised updates
:mod:`secagg.local`                       every party in one process (tests, bench)
========================================  ==================================================
"""

from __future__ import annotations

from .crypto import KEY_AGREEMENTS, AuthenticationError
from .local import run_local
from .protocol import (
    STAGES,
    Msg,
    SecAggAbort,
    SecAggParams,
    SecAggResult,
    ServerSession,
    client_step,
    state_from_json,
    state_to_json,
)
from .quantise import Quantiser

__all__ = [
    "KEY_AGREEMENTS",
    "STAGES",
    "AuthenticationError",
    "Msg",
    "Quantiser",
    "SecAggAbort",
    "SecAggParams",
    "SecAggResult",
    "ServerSession",
    "client_step",
    "run_local",
    "state_from_json",
    "state_to_json",
]
