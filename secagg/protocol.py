"""SecAgg+ [Bell et al., CCS 2020] as two pure state machines: one client, one server.

No transport here: the server's methods take the replies of one stage and return the
requests of the next (:class:`Msg` values keyed by node id); the client's
:func:`client_step` takes one request and its saved state and returns the reply and the new
state. A node that does not answer, or answers with an error or a malformed reply, has
dropped at that stage.

The four stages (the config field ``stage`` of each request)::

    advertise-keys  server -> U0   params, n
                    client -> S    public keys: c (channel) and s (masks), X25519
                                   [hybrid: and one ML-KEM-768 key for each]
    share-keys      server -> U1   members U1, graph seed, the neighbours' public keys
                    client -> S    for each neighbour j: E_ij(share of b_i, share of s_i)
                                   [hybrid: KEM ciphertexts; the mask KEM secret, wrapped]
    masked-input    server -> U2   the model (by the caller), the shares sent to it
                    client -> S    y_i = w_i z_i + PRG(b_i) + sum_j +-PRG(p_ij) mod 2^k
    unmask          server -> U3   survivors U3, dropped D = U2 \\ U3
                    client -> S    shares of b_j for j in U3, of s_j for j in D

The server sums ``y_i`` over ``U3``, removes ``PRG(b_i)`` (``b_i`` from ``t`` shares) and
the masks survivors made with dropped clients (``s_j`` from ``t`` shares, ``p_ij``
recomputed). Up to the threshold, dropouts at any stage only shrink the sum: a client that
drops before sharing keys is left out of the graph; one whose shares too few neighbours
hold is left out before anyone masks with it; one that drops after sharing keys has its
masks removed; one that drops while unmasking is still summed. Below the threshold the
server raises :class:`SecAggAbort` naming the stage and the reason.

``b_i`` and ``s_i`` are shared only among the client's neighbours (``k`` of them, threshold
``t``); an honest client never reveals both ``b_j`` and ``s_j`` shares of one neighbour in
a round, and answers ``unmask`` once.

Hybrid key agreement. A KEM has no Diffie-Hellman symmetry: one side encapsulates to the
other's public key and sends the ciphertext. The channel key of ``i -> j`` mixes
``X25519(c_i, c_j)`` with a secret ``i`` encapsulated to ``j``'s channel KEM key (sent with
the encrypted shares, so the channel costs no extra message). The mask seed ``p_ij`` mixes
``X25519(s_i, s_j)`` with a secret the lower id encapsulated to the higher id's mask KEM
key. When a client drops, the server must recompute its ``p_ij`` from its reconstructed
secret ``s_j``: the decapsulation key (for pairs where ``j`` was the receiver) is part of
``s_j``, and for pairs where ``j`` encapsulated, ``j`` uploaded the KEM secret wrapped
under a key derived from that decapsulation key. The encapsulator proves the key to the
receiver inside the encrypted shares, so a tampered ciphertext fails loudly
(:class:`~secagg.crypto.AuthenticationError`) instead of silently corrupting the sum.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import shamir
from .crypto import (
    KEM_CIPHERTEXT_BYTES,
    KEM_PUBLIC_BYTES,
    KEM_SEED_BYTES,
    KEY_AGREEMENTS,
    X25519_BYTES,
    AuthenticationError,
    RandomBytes,
    decrypt,
    encrypt,
    hkdf,
    kem_decapsulate,
    kem_encapsulate,
    kem_keypair,
    kem_private,
    mask_stream,
    x25519_keypair,
    x25519_private,
    x25519_shared,
)
from .ddp import DistributedDP
from .graph import neighbour_count, neighbours, threshold_for
from .quantise import Quantiser, ring_dtype

__all__ = [
    "STAGES",
    "Msg",
    "SecAggAbort",
    "SecAggParams",
    "SecAggResult",
    "ServerSession",
    "client_step",
]

STAGES = ("advertise-keys", "share-keys", "masked-input", "unmask")
SEED_BYTES = 32
WRAP_BYTES = 32 + 16  # a KEM secret under ChaCha20-Poly1305
CONFIRM_BYTES = 32
EXTRA = 2  # coordinates after the update: the weight, the number of clipped coordinates

Vector = NDArray[np.unsignedinteger]


class SecAggAbort(RuntimeError):
    """The round cannot complete: too few clients left at ``stage`` (``reason`` says why)."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"secure aggregation failed at stage {stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class SecAggParams:
    """The protocol's public parameters.

    Attributes
    ----------
    threshold
        Shares needed to rebuild a client's secrets: an int ``t``, or a fraction ``q`` of
        its ``k`` neighbours (``t = ceil(q k)``). ``t > k / 2`` keeps a server that lies
        about who dropped from obtaining both secrets of one client.
    neighbours
        ``"all"`` (SecAgg), ``"log"`` (``2 ceil(log2 n)``, SecAgg+) or an int ``k``.
    clip
        Coordinate-wise clipping range ``c`` of the updates.
    bits
        ``k``: arithmetic modulo ``2^k``.
    key_agreement
        ``"x25519"`` or ``"hybrid"`` (X25519 and ML-KEM-768 through HKDF).
    max_weight
        Largest integer weight (example count) a client may have; sizes the quantiser.
    noise_multiplier
        ``z``; ``0`` (default): no noise. ``z > 0``: distributed DP (:mod:`secagg.ddp`):
        ``clip`` is then the L2 clipping norm ``C``, every weight is 1, and each client adds
        discrete Gaussian noise so that any ``t`` survivors' sum has noise ``z Delta``.
    """

    threshold: int | float = 0.6
    neighbours: int | str = "log"
    clip: float = 1.0
    bits: int = 32
    key_agreement: str = "x25519"
    max_weight: int = 1024
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if self.key_agreement not in KEY_AGREEMENTS:
            raise ValueError(f"secagg key_agreement must be one of {', '.join(KEY_AGREEMENTS)}, "
                             f"got {self.key_agreement!r}")
        neighbour_count(self.neighbours, 3)
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) \
                or (isinstance(t, int) and t < 1) or (isinstance(t, float) and not 0 < t <= 1):
            raise ValueError(f"secagg threshold must be an int >= 1 (shares) or a fraction in "
                             f"(0, 1] of the neighbours, got {t!r}")
        if isinstance(self.max_weight, bool) or not isinstance(self.max_weight, int) \
                or self.max_weight < 1:
            raise ValueError(f"secagg max_weight must be an int >= 1, got {self.max_weight!r}")
        Quantiser.for_round(clip=self.clip, bits=self.bits, num_clients=1,
                            max_weight=self.max_weight)
        z = self.noise_multiplier
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not 0 <= z < math.inf:
            raise ValueError(f"secagg noise_multiplier must be a finite number >= 0, got {z!r}")
        if self.dp:
            DistributedDP.for_round(clip=self.clip, noise_multiplier=z, bits=self.bits,
                                    num_clients=1, dim=1)

    @property
    def dp(self) -> bool:
        """Distributed DP: each client noises its update (``noise_multiplier > 0``)."""
        return self.noise_multiplier > 0

    @property
    def hybrid(self) -> bool:
        return self.key_agreement == "hybrid"

    def to_config(self) -> dict[str, int | float | str]:
        return {"threshold": self.threshold, "neighbours": self.neighbours, "clip": self.clip,
                "bits": self.bits, "key_agreement": self.key_agreement,
                "max_weight": self.max_weight, "noise_multiplier": self.noise_multiplier}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SecAggParams:
        return cls(**{k: cfg[k] for k in cls().to_config()})

    def dp_for(self, num_clients: int, dim: int) -> DistributedDP:
        """The distributed DP grid of a round of ``num_clients`` clients and ``d = dim``."""
        return DistributedDP.for_round(clip=self.clip, noise_multiplier=self.noise_multiplier,
                                       bits=self.bits, num_clients=num_clients, dim=dim)


@dataclass
class Msg:
    """One protocol message: scalars, byte strings, and (masked input) one ring vector."""

    config: dict[str, int | float | str] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    vector: Vector | None = None


# -- key derivations shared by both sides ------------------------------------------------
def _channel_key(session: str, sender: int, receiver: int, dh: bytes, kem: bytes) -> bytes:
    return hkdf(dh + kem, f"channel {session} {sender}->{receiver}".encode())


def _pair_seed(session: str, a: int, b: int, dh: bytes, kem: bytes) -> bytes:
    lo, hi = sorted((a, b))
    return hkdf(dh + kem, f"pair mask {session} {lo} {hi}".encode())


def _confirm(session: str, a: int, b: int, kem: bytes) -> bytes:
    lo, hi = sorted((a, b))
    return hkdf(kem, f"kem confirm {session} {lo} {hi}".encode())


def _wrap_key(kem_seed: bytes, session: str, a: int, b: int) -> bytes:
    """One key per pair: each key seals one message under the zero nonce."""
    lo, hi = sorted((a, b))
    return hkdf(kem_seed, f"kem wrap {session} {lo} {hi}".encode())


def _wrap_aad(session: str, a: int, b: int) -> bytes:
    lo, hi = sorted((a, b))
    return f"wrap {session} {lo} {hi}".encode()


def _share_aad(session: str, sender: int, receiver: int) -> bytes:
    return f"shares {session} {sender}->{receiver}".encode()


def _ids(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _fmt_ids(ids: Sequence[int]) -> str:
    return ",".join(str(i) for i in sorted(ids))


def _secret_bytes(hybrid: bool) -> int:
    """Length of the shared mask secret ``s_i``: X25519 key [+ ML-KEM seed]."""
    return X25519_BYTES + (KEM_SEED_BYTES if hybrid else 0)


def _keys_len(hybrid: bool) -> int:
    return 2 * X25519_BYTES + (2 * KEM_PUBLIC_BYTES if hybrid else 0)


def _split_keys(blob: bytes, hybrid: bool) -> dict[str, bytes]:
    if len(blob) != _keys_len(hybrid):
        raise ValueError(f"public keys blob has {len(blob)} bytes, expected {_keys_len(hybrid)}")
    out = {"c": blob[:32], "s": blob[32:64]}
    if hybrid:
        out["c-kem"] = blob[64:64 + KEM_PUBLIC_BYTES]
        out["s-kem"] = blob[64 + KEM_PUBLIC_BYTES:]
    return out


def _split_share_blob(blob: bytes, sender: int, receiver: int, hybrid: bool
                      ) -> tuple[bytes, bytes, bytes]:
    """``(channel KEM ciphertext, mask KEM ciphertext, AEAD ciphertext)`` of ``sender -> receiver``."""
    if not hybrid:
        return b"", b"", blob
    ct_c, rest = blob[:KEM_CIPHERTEXT_BYTES], blob[KEM_CIPHERTEXT_BYTES:]
    ct_s = b""
    if sender < receiver:
        ct_s, rest = rest[:KEM_CIPHERTEXT_BYTES], rest[KEM_CIPHERTEXT_BYTES:]
    return ct_c, ct_s, rest


# -- client -------------------------------------------------------------------------------
def client_step(
    msg: Msg,
    state: Mapping[str, Any] | None,
    *,
    me: int,
    train: Callable[[], tuple[NDArray[np.floating], int]],
    random_bytes: RandomBytes = os.urandom,
    noise_seed: int | None = None,
) -> tuple[Msg, dict[str, Any]]:
    """Answer one server request; ``state`` is what the previous step returned (JSON-able).

    ``train()`` is called only at ``masked-input`` and returns the update ``(d,)`` and the
    client's integer weight. ``noise_seed`` seeds the distributed DP noise (needed when the
    server's parameters ask for it; a seed the server cannot know keeps the noise secret
    from it, see ``docs/secagg.md``).

    Raises
    ------
    ValueError
        A request out of order, for another session, or inconsistent with what this client
        computed itself (its neighbours, the survivors).
    AuthenticationError
        A tampered share ciphertext or KEM ciphertext.
    """
    stage = str(msg.config.get("stage", ""))
    if stage not in STAGES:
        raise ValueError(f"unknown secagg stage {stage!r}; expected one of {', '.join(STAGES)}")
    session = str(msg.config["session"])
    if stage == "advertise-keys":
        return _advertise(msg, session, me, random_bytes)
    if state is None or state.get("session") != session:
        raise ValueError(
            f"secagg stage {stage} of session {session} reached a client with no state for it "
            f"(it holds session {None if state is None else state.get('session')!r}); the "
            "client missed the advertise-keys stage"
        )
    expected = STAGES[STAGES.index(stage) - 1]
    if state["done"] != expected:
        raise ValueError(f"secagg stage {stage} after {state['done']}: expected it after {expected}")
    if stage == "share-keys":
        return _share_keys(msg, dict(state), me, random_bytes)
    if stage == "masked-input":
        update, weight = train()
        return _masked_input(msg, dict(state), me, update, weight, noise_seed)
    return _unmask(msg, dict(state), me)


def _advertise(msg: Msg, session: str, me: int, random_bytes: RandomBytes
               ) -> tuple[Msg, dict[str, Any]]:
    params = SecAggParams.from_config(msg.config)
    n = int(msg.config["num-clients"])
    if params.dp:
        levels = params.dp_for(n, int(msg.config["dim"])).levels
    else:
        levels = Quantiser.for_round(clip=params.clip, bits=params.bits, num_clients=n,
                                     max_weight=params.max_weight).levels
    if int(msg.config["levels"]) != levels:
        raise ValueError(f"server asks for {msg.config['levels']} quantisation levels, but "
                         f"{levels} follow from its parameters")
    c, s = x25519_keypair(random_bytes), x25519_keypair(random_bytes)
    state: dict[str, Any] = {
        "session": session, "done": "advertise-keys", "params": params.to_config(),
        "num-clients": n, "c-sk": c.private.hex(), "s-sk": s.private.hex(),
    }
    if params.dp:
        state["dim"] = int(msg.config["dim"])
    keys = c.public + s.public
    if params.hybrid:
        c_kem, c_kem_pk = kem_keypair(random_bytes)
        s_kem, s_kem_pk = kem_keypair(random_bytes)
        state.update({"c-kem": c_kem.hex(), "s-kem": s_kem.hex()})
        keys += c_kem_pk + s_kem_pk
    return Msg(blobs={"keys": keys}), state


def _share_keys(msg: Msg, state: dict[str, Any], me: int, random_bytes: RandomBytes
                ) -> tuple[Msg, dict[str, Any]]:
    params = SecAggParams.from_config(state["params"])
    session = state["session"]
    members = _ids(str(msg.config["members"]))
    if me not in members or len(members) > state["num-clients"]:
        raise ValueError(f"share-keys: members {members} do not fit this client ({me}) or "
                         f"the {state['num-clients']} clients announced")
    k = neighbour_count(params.neighbours, len(members))
    t = threshold_for(params.threshold, k)
    mine = neighbours(members, k, int(msg.config["graph-seed"]))[me]
    given = {int(key.split(":")[1]) for key in msg.blobs if key.startswith("keys:")}
    if given != set(mine):
        raise ValueError(f"share-keys: the server sent keys of {sorted(given)}, but this "
                         f"client's neighbours are {sorted(mine)}")
    keys = {j: _split_keys(msg.blobs[f"keys:{j}"], params.hybrid) for j in mine}
    b = random_bytes(SEED_BYTES)
    s_secret = bytes.fromhex(state["s-sk"])
    if params.hybrid:
        s_secret += bytes.fromhex(state["s-kem"])
    holders = sorted(mine)
    b_shares = shamir.share(b, holders, t, random_bytes)
    s_shares = shamir.share(s_secret, holders, t, random_bytes)
    out = Msg()
    kem_secrets: dict[str, str] = {}
    c_sk = x25519_private(bytes.fromhex(state["c-sk"]))  # loaded once for all neighbours
    for j in holders:
        dh_c = x25519_shared(c_sk, keys[j]["c"])
        prefix, kem_c, plain_extra = b"", b"", b""
        if params.hybrid:
            kem_c, ct_c = kem_encapsulate(keys[j]["c-kem"])
            prefix = ct_c
            if me < j:  # the lower id encapsulates the mask secret of the pair
                kem_s, ct_s = kem_encapsulate(keys[j]["s-kem"])
                prefix += ct_s
                kem_secrets[str(j)] = kem_s.hex()
                plain_extra = _confirm(session, me, j, kem_s)
                out.blobs[f"wrap:{j}"] = encrypt(
                    _wrap_key(bytes.fromhex(state["s-kem"]), session, me, j), kem_s, _wrap_aad(session, me, j))
        key = _channel_key(session, me, j, dh_c, kem_c)
        plain = b_shares[j] + s_shares[j] + plain_extra
        out.blobs[f"to:{j}"] = prefix + encrypt(key, plain, _share_aad(session, me, j))
    state.update({
        "done": "share-keys", "members": members, "neighbours": holders, "t": t,
        "keys": {str(j): {n: v.hex() for n, v in keys[j].items()} for j in holders},
        "b": b.hex(), "kem-secrets": kem_secrets,
    })
    return out, state


def _masked_input(
    msg: Msg, state: dict[str, Any], me: int, update: NDArray[np.floating], weight: int,
    noise_seed: int | None,
) -> tuple[Msg, dict[str, Any]]:
    params = SecAggParams.from_config(state["params"])
    session = state["session"]
    hybrid = params.hybrid
    q = Quantiser.for_round(clip=params.clip, bits=params.bits,
                            num_clients=state["num-clients"], max_weight=params.max_weight)
    if params.dp and noise_seed is None:
        raise ValueError("masked-input: the server asks for distributed DP "
                         f"(noise_multiplier={params.noise_multiplier}) but this client was "
                         "given no noise_seed")
    if not params.dp and weight > params.max_weight:
        raise ValueError(f"this client's weight {weight} exceeds secagg max_weight="
                         f"{params.max_weight}: raise max_weight in the secagg setting")
    senders = sorted(int(key.split(":")[1]) for key in msg.blobs if key.startswith("from:"))
    strangers = set(senders) - set(state["neighbours"])
    if strangers:
        raise ValueError(f"masked-input: shares from {sorted(strangers)}, who are not "
                         "neighbours of this client")
    n_b = shamir.SHARE_CHUNK_BYTES
    n_s = n_b * _secret_bytes(hybrid) // shamir.CHUNK
    held: dict[str, dict[str, str]] = {}
    seeds: dict[int, bytes] = {}
    # keys loaded (ML-KEM: expanded from its seed) once for all neighbours
    c_sk, s_sk = (x25519_private(bytes.fromhex(state[k])) for k in ("c-sk", "s-sk"))
    c_kem_sk = kem_private(bytes.fromhex(state["c-kem"])) if hybrid else None
    s_kem_sk = kem_private(bytes.fromhex(state["s-kem"])) if hybrid else None
    for i in senders:
        keys = {n: bytes.fromhex(v) for n, v in state["keys"][str(i)].items()}
        ct_c, ct_s, sealed = _split_share_blob(msg.blobs[f"from:{i}"], i, me, hybrid)
        kem_c = kem_decapsulate(c_kem_sk, ct_c) if c_kem_sk is not None else b""
        dh_c = x25519_shared(c_sk, keys["c"])
        plain = decrypt(_channel_key(session, i, me, dh_c, kem_c), sealed,
                        _share_aad(session, i, me), f"the shares client {i} sent to {me}")
        expected = n_b + n_s + (CONFIRM_BYTES if hybrid and i < me else 0)
        if len(plain) != expected:
            raise ValueError(f"shares from {i} have {len(plain)} bytes, expected {expected}")
        held[str(i)] = {"b": plain[:n_b].hex(), "s": plain[n_b:n_b + n_s].hex()}
        kem_s = b""
        if hybrid:
            if i < me:
                assert s_kem_sk is not None
                kem_s = kem_decapsulate(s_kem_sk, ct_s)
                if _confirm(session, i, me, kem_s) != plain[n_b + n_s:]:
                    raise AuthenticationError(
                        f"the mask KEM ciphertext of pair ({i}, {me}) failed key confirmation: "
                        "it was altered in transit")
            else:
                kem_s = bytes.fromhex(state["kem-secrets"][str(i)])
        dh_s = x25519_shared(s_sk, keys["s"])
        seeds[i] = _pair_seed(session, i, me, dh_s, kem_s)
    if params.dp:  # the L2-clipped update on the grid, plus this client's share of the noise
        ddp = params.dp_for(state["num-clients"], state["dim"])
        noise = ddp.noise(state["t"], np.random.default_rng(noise_seed))
        encoded = q.reduce(ddp.encode(update) + noise)
        weight, clipped = 1, 0  # unweighted, and no un-noised statistic
    else:
        encoded, clipped = q.encode(update, weight)
    d = encoded.shape[0]
    y = np.concatenate([encoded, np.array([weight, clipped], dtype=q.dtype)])
    y += mask_stream(bytes.fromhex(state["b"]), d + EXTRA, params.bits)  # in place: y is ours
    for i, seed in seeds.items():
        stream = mask_stream(seed, d + EXTRA, params.bits)
        if me < i:
            y += stream
        else:
            y -= stream
    state.update({"done": "masked-input", "held": held})
    for secret in ("kem-secrets", "b"):  # no longer needed: the server unmasks from shares
        state.pop(secret)
    return Msg(vector=q.reduce(y)), state


def _unmask(msg: Msg, state: dict[str, Any], me: int) -> tuple[Msg, dict[str, Any]]:
    survivors = set(_ids(str(msg.config["survivors"])))
    dropped = set(_ids(str(msg.config["dropped"])))
    if survivors & dropped:
        raise ValueError(f"unmask: clients {sorted(survivors & dropped)} are listed as both "
                         "survivors and dropped; refusing to reveal both of their secrets")
    if me not in survivors:
        raise ValueError(f"unmask: this client ({me}) sent its masked input but is not listed "
                         "among the survivors")
    if len(survivors) < state["t"]:
        raise ValueError(f"unmask: only {len(survivors)} survivors, fewer than the threshold "
                         f"{state['t']}; refusing to unmask so small a sum")
    out = Msg()
    for i, shares in state["held"].items():
        if int(i) in survivors:
            out.blobs[f"b:{i}"] = bytes.fromhex(shares["b"])
        elif int(i) in dropped:
            out.blobs[f"s:{i}"] = bytes.fromhex(shares["s"])
    # answer once: nothing is left to reveal in this session
    return out, {"session": state["session"], "done": "unmask"}


# -- server -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SecAggResult:
    """What the server learns: ``S = sum_i w_i z_i`` and ``W`` over the survivors ``U3``."""

    total: Vector  # (d,) in Z_{2^k}
    weight: int
    clipped: int  # coordinates clipped, summed over the survivors
    survivors: tuple[int, ...]
    dropped: dict[str, dict[int, str]]  # stage -> node -> why
    quantiser: Quantiser
    dp: DistributedDP | None = None  # distributed DP: the sum holds noise
    threshold: int = 0  # t of this aggregation

    def mean(self) -> NDArray[np.float64]:
        """The weighted mean ``(d,)`` of the survivors' clipped updates (within
        ``quantiser.error_bound`` per coordinate); with distributed DP the noised sum over
        the number of survivors."""
        if self.dp is not None:
            return self.noised_sum() / self.weight
        return self.quantiser.decode(self.total, self.weight)

    def noised_sum(self) -> NDArray[np.float64]:
        """Distributed DP: ``(d,)`` the sum of the survivors' L2-clipped updates plus noise of
        variance ``n_s sigma^2 / t`` per integer coordinate (times ``step^2``)."""
        if self.dp is None:
            raise ValueError("noised_sum() needs distributed DP (noise_multiplier > 0)")
        return self.dp.decode_sum(self.total, len(self.survivors))


class ServerSession:
    """The server's side of one secure aggregation among ``members``.

    Call, in order, :meth:`advertise`, :meth:`share_keys`, :meth:`masked_input`,
    :meth:`unmask` and :meth:`result`, each with the replies to the previous requests
    (``node -> Msg``, or ``node -> str`` for an error reply). A node absent from the
    replies has dropped. Each may raise :class:`SecAggAbort`.

    Parameters
    ----------
    params
        The protocol's public parameters.
    members
        ``U0``, the node ids asked to take part.
    session
        A label unique to this aggregation (round and group), bound into every key.
    graph_seed
        Seed of the neighbour graph.
    dim
        ``d``, the update's length.
    min_survivors
        Fewer clients than this left at any stage aborts (at least 2: the sum of one input
        is that input).
    """

    def __init__(self, params: SecAggParams, members: Sequence[int], *, session: str,
                 graph_seed: int, dim: int, min_survivors: int = 2) -> None:
        self.params = params
        self.members = sorted(set(members))
        self.session = session
        self.graph_seed = graph_seed
        self.dim = dim
        self.min_survivors = max(2, min_survivors)
        if len(self.members) < self.min_survivors:
            raise SecAggAbort("advertise-keys", f"{len(self.members)} clients sampled, fewer than "
                              f"the {self.min_survivors} secure aggregation needs")
        self.quantiser = Quantiser.for_round(
            clip=params.clip, bits=params.bits, num_clients=len(self.members),
            max_weight=params.max_weight)
        self.dp = params.dp_for(len(self.members), dim) if params.dp else None
        if len(self.members) * dim >= 2**params.bits:
            raise ValueError(f"bits={params.bits} cannot count the clipped coordinates of "
                             f"{len(self.members)} clients with d={dim}: raise bits")
        self.dropped: dict[str, dict[int, str]] = {s: {} for s in STAGES}
        self.keys: dict[int, dict[str, bytes]] = {}
        self.graph: dict[int, frozenset[int]] = {}
        self.t = 0
        self.shared: dict[int, dict[str, bytes]] = {}  # sender -> "to:j"/"wrap:j" -> blob
        self.u2: list[int] = []
        self.u3: dict[int, Vector] = {}
        self.asked_unmask: set[int] = set()

    def _received(self, stage: str, asked: Sequence[int], replies: Mapping[int, Msg | str],
                  check: Callable[[int, Msg], str | None]) -> dict[int, Msg]:
        ok: dict[int, Msg] = {}
        for node in asked:
            r = replies.get(node)
            why = ("no reply (lost, or too slow for round-timeout)" if r is None
                   else r if isinstance(r, str) else check(node, r))
            if why is None:
                assert isinstance(r, Msg)
                ok[node] = r
            else:
                self.dropped[stage][node] = why
        return ok

    def _too_few(self, stage: str, left: int, of: int) -> None:
        if left < self.min_survivors:
            lost = "; ".join(f"{n}: {w}" for n, w in sorted(self.dropped[stage].items())[:5])
            raise SecAggAbort(stage, f"{left} of {of} clients left, fewer than the "
                              f"{self.min_survivors} needed (dropped: {lost or 'none'})")

    def _request(self, stage: str, **config: int | float | str) -> Msg:
        return Msg(config={"stage": stage, "session": self.session, **config})

    def advertise(self) -> dict[int, Msg]:
        """Requests of stage ``advertise-keys`` to every member."""
        extra: dict[str, int] = {"num-clients": len(self.members),
                                 "levels": self.quantiser.levels}
        if self.dp is not None:
            extra.update(levels=self.dp.levels, dim=self.dim)
        msg = self._request("advertise-keys", **self.params.to_config(), **extra)
        return {n: msg for n in self.members}

    def share_keys(self, replies: Mapping[int, Msg | str]) -> dict[int, Msg]:
        """Requests of stage ``share-keys``: the members ``U1`` and each one's neighbours' keys."""
        hybrid = self.params.hybrid

        def check(node: int, r: Msg) -> str | None:
            try:
                self.keys[node] = _split_keys(r.blobs.get("keys", b""), hybrid)
            except ValueError as exc:
                return str(exc)
            return None

        u1 = sorted(self._received("advertise-keys", self.members, replies, check))
        self._too_few("advertise-keys", len(u1), len(self.members))
        k = neighbour_count(self.params.neighbours, len(u1))
        try:
            self.t = threshold_for(self.params.threshold, k)
        except ValueError as exc:
            raise SecAggAbort("advertise-keys", str(exc)) from None
        self.graph = neighbours(u1, k, self.graph_seed)
        out = {}
        for i in u1:
            blobs = {}
            for j in self.graph[i]:
                kj = self.keys[j]
                blobs[f"keys:{j}"] = kj["c"] + kj["s"] + (kj["c-kem"] + kj["s-kem"] if hybrid else b"")
            out[i] = Msg(config=self._request("share-keys", members=_fmt_ids(u1),
                                              **{"graph-seed": self.graph_seed}).config,
                         blobs=blobs)
        return out

    def masked_input(self, replies: Mapping[int, Msg | str]) -> dict[int, Msg]:
        """Requests of stage ``masked-input``: each client gets the shares sent to it (the
        caller adds the model)."""
        hybrid = self.params.hybrid
        u1 = sorted(self.graph)

        def check(node: int, r: Msg) -> str | None:
            want = {f"to:{j}" for j in self.graph[node]}
            if hybrid:
                want |= {f"wrap:{j}" for j in self.graph[node] if node < j}
            if set(r.blobs) != want:
                return f"share-keys reply has blobs {sorted(r.blobs)[:4]}..., expected {len(want)}"
            return None

        got = self._received("share-keys", u1, replies, check)
        u2 = set(got)
        while True:  # leave out clients whose shares too few remaining neighbours hold
            weak = {i for i in u2 if len(self.graph[i] & u2) < self.t}
            if not weak:
                break
            for i in weak:
                self.dropped["share-keys"][i] = (
                    f"only {len(self.graph[i] & u2)} of its neighbours shared keys, fewer "
                    f"than the threshold {self.t}: left out before anyone masked with it")
            u2 -= weak
        self.u2 = sorted(u2)
        self._too_few("share-keys", len(self.u2), len(u1))
        self.shared = {i: got[i].blobs for i in self.u2}
        return {
            j: Msg(config=self._request("masked-input").config,
                   blobs={f"from:{i}": self.shared[i][f"to:{j}"] for i in self.graph[j] & u2})
            for j in self.u2
        }

    def unmask(self, replies: Mapping[int, Msg | str]) -> dict[int, Msg]:
        """Requests of stage ``unmask`` to the survivors ``U3``."""
        dtype = ring_dtype(self.params.bits)
        size = self.dim + EXTRA

        def check(node: int, r: Msg) -> str | None:
            v = r.vector
            if v is None or v.dtype != dtype or v.shape != (size,):
                return (f"masked input must be ({size},) {np.dtype(dtype).name}, got "
                        f"{None if v is None else (v.shape, v.dtype.name)}")
            return None

        self.u3 = {n: m.vector for n, m in  # type: ignore[misc]
                   self._received("masked-input", self.u2, replies, check).items()}
        self._too_few("masked-input", len(self.u3), len(self.u2))
        survivors, dropped = set(self.u3), set(self.u2) - set(self.u3)
        for i in self._secrets_needed(survivors, dropped):
            holders = self.graph[i] & set(self.u2) & survivors
            if len(holders) < self.t:
                raise SecAggAbort("masked-input", (
                    f"client {i}'s secrets are held by {len(holders)} surviving neighbours, "
                    f"fewer than the threshold {self.t}"))
        msg = self._request("unmask", survivors=_fmt_ids(sorted(survivors)),
                            dropped=_fmt_ids(sorted(dropped)))
        self.asked_unmask = survivors
        return {n: msg for n in sorted(survivors)}

    def _secrets_needed(self, survivors: set[int], dropped: set[int]) -> list[int]:
        """Survivors (their self-mask seeds) and dropped clients some survivor masked with."""
        return sorted(survivors | {j for j in dropped if self.graph[j] & survivors})

    def result(self, replies: Mapping[int, Msg | str]) -> SecAggResult:
        """The unmasked sum over ``U3``, from the survivors' shares."""
        survivors = set(self.u3)
        dropped = set(self.u2) - survivors
        got = self._received("unmask", sorted(self.asked_unmask), replies, lambda n, r: None)
        bits, size, hybrid = self.params.bits, self.dim + EXTRA, self.params.hybrid
        dtype = ring_dtype(bits)
        total = np.zeros(size, dtype=dtype)
        for v in self.u3.values():
            total += v
        for i in self._secrets_needed(survivors, dropped):
            kind = "b" if i in survivors else "s"
            shares = {j: got[j].blobs[f"{kind}:{i}"] for j in self.graph[i] & set(got)
                      if f"{kind}:{i}" in got[j].blobs}
            what = "self-mask seed" if kind == "b" else "mask key"
            if len(shares) < self.t:
                raise SecAggAbort("unmask", f"client {i}'s {what}: {len(shares)} shares returned, "
                                  f"fewer than the threshold {self.t}")
            try:
                secret = shamir.reconstruct(shares, self.t)
            except ValueError as exc:
                raise SecAggAbort("unmask", f"client {i}'s {what}: {exc}") from None
            if kind == "b":
                total -= mask_stream(secret, size, bits)
                continue
            s_sk, s_kem = secret[:X25519_BYTES], secret[X25519_BYTES:]
            s_key = x25519_private(s_sk)  # loaded once for all of i's surviving neighbours
            s_kem_key = kem_private(s_kem) if hybrid and any(
                j < i for j in self.graph[i] & survivors) else None
            for j in sorted(self.graph[i] & survivors):
                kem = b""
                if hybrid:
                    if i < j:  # i encapsulated and uploaded the secret wrapped
                        kem = decrypt(_wrap_key(s_kem, self.session, i, j), self.shared[i][f"wrap:{j}"],
                                      _wrap_aad(self.session, i, j), f"the KEM wrap of {i}")
                    else:
                        _, ct_s, _ = _split_share_blob(self.shared[j][f"to:{i}"], j, i, True)
                        assert s_kem_key is not None
                        kem = kem_decapsulate(s_kem_key, ct_s)
                seed = _pair_seed(self.session, i, j,
                                  x25519_shared(s_key, self.keys[j]["s"]), kem)
                stream = mask_stream(seed, size, bits)
                # j added the stream if j < i, else subtracted it
                if j < i:
                    total -= stream
                else:
                    total += stream
        total = self.quantiser.reduce(total)
        weight, clipped = int(total[self.dim]), int(total[self.dim + 1])
        return SecAggResult(total[:self.dim].copy(), weight, clipped, tuple(sorted(survivors)),
                            {s: dict(v) for s, v in self.dropped.items()}, self.quantiser,
                            self.dp, self.t)


def state_to_json(state: Mapping[str, Any]) -> str:
    """A client state as one string (what Flower's ``Context.state`` stores)."""
    return json.dumps(state, separators=(",", ":"))


def state_from_json(text: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(text)
    return out
