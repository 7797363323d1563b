"""Shamir's secret sharing [Shamir, 1979] over the prime field ``GF(p)``, ``p = 2^256 + 297``.

A secret of ``32 m`` bytes is cut into ``m`` chunks; each chunk, read as an integer below
``2^256 < p``, is the constant term of a random polynomial of degree ``t - 1``, and holder
``x`` gets its values at ``x``. Any ``t`` shares give the secret back (Lagrange at 0); any
``t - 1`` are consistent with every secret (perfect secrecy).

Why this field and not pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir``: that one
works in ``GF(2^128)`` and shares 16-byte secrets, so a 32-byte key would have to be cut in
two halves shared separately. ``p = 2^256 + 297`` is the smallest prime above ``2^256``:
every 32-byte string is a field element, a share is 33 bytes, and Python's integers do
the arithmetic (``t`` multiplications per share and chunk; negligible next to the masks).
Holders are identified by ``x = node_id + 1`` (never 0, distinct for distinct nodes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from .crypto import RandomBytes

__all__ = ["PRIME", "SHARE_CHUNK_BYTES", "reconstruct", "share"]

PRIME = 2**256 + 297
CHUNK = 32  # secret bytes per field element
SHARE_CHUNK_BYTES = 33  # one field element, big-endian


def _random_element(random_bytes: RandomBytes) -> int:
    while True:  # rejection sampling: uniform in [0, p)
        v = int.from_bytes(random_bytes(SHARE_CHUNK_BYTES), "big") & ((1 << 257) - 1)
        if v < PRIME:
            return v


def _x(holder: int) -> int:
    if holder < 0:
        raise ValueError(f"share holders are node ids >= 0, got {holder}")
    return holder + 1


def share(
    secret: bytes, holders: Sequence[int], t: int, random_bytes: RandomBytes = os.urandom
) -> dict[int, bytes]:
    """Split ``secret`` (a multiple of 32 bytes) into one share per holder, threshold ``t``.

    Returns
    -------
    dict
        ``holder -> share`` (33 bytes per 32 secret bytes).

    Raises
    ------
    ValueError
        If ``t`` is not in ``[1, len(holders)]``, holders repeat, or the length is wrong.

    Examples
    --------
    >>> s = share(bytes(range(32)), [10, 11, 12], t=2)
    >>> reconstruct({10: s[10], 12: s[12]}, t=2) == bytes(range(32))
    True
    """
    if not secret or len(secret) % CHUNK:
        raise ValueError(f"secret length must be a positive multiple of {CHUNK}, got {len(secret)}")
    if len(set(holders)) != len(holders):
        raise ValueError("share holders must be distinct")
    if not 1 <= t <= len(holders):
        raise ValueError(f"threshold t={t} must be in [1, {len(holders)}] (the number of holders)")
    xs = {h: _x(h) for h in holders}
    out: dict[int, list[bytes]] = {h: [] for h in holders}
    for c in range(0, len(secret), CHUNK):
        coeffs = [int.from_bytes(secret[c:c + CHUNK], "big")]
        coeffs += [_random_element(random_bytes) for _ in range(t - 1)]
        for h, x in xs.items():
            y = 0
            for a in reversed(coeffs):  # Horner
                y = (y * x + a) % PRIME
            out[h].append(y.to_bytes(SHARE_CHUNK_BYTES, "big"))
    return {h: b"".join(parts) for h, parts in out.items()}


def reconstruct(shares: Mapping[int, bytes], t: int) -> bytes:
    """The secret from at least ``t`` shares (``holder -> share``); uses ``t`` of them.

    Raises
    ------
    ValueError
        Fewer than ``t`` shares, shares of different lengths, or a result that is not a
        secret (shares that do not belong together).
    """
    if len(shares) < t:
        raise ValueError(f"need {t} shares to reconstruct, got {len(shares)}")
    chosen = sorted(shares)[:t]
    lengths = {len(shares[h]) for h in chosen}
    if len(lengths) != 1 or lengths.pop() % SHARE_CHUNK_BYTES:
        raise ValueError("shares have inconsistent lengths")
    xs = [_x(h) for h in chosen]
    # Lagrange basis at 0: l_j = prod_{m != j} x_m / (x_m - x_j)
    basis = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        basis.append(num * pow(den, -1, PRIME) % PRIME)
    n_chunks = len(shares[chosen[0]]) // SHARE_CHUNK_BYTES
    out = []
    for c in range(n_chunks):
        sl = slice(c * SHARE_CHUNK_BYTES, (c + 1) * SHARE_CHUNK_BYTES)
        v = sum(int.from_bytes(shares[h][sl], "big") * b for h, b in zip(chosen, basis, strict=True))
        v %= PRIME
        if v >= 1 << (8 * CHUNK):
            raise ValueError("the shares do not belong to one secret (reconstructed value too large)")
        out.append(v.to_bytes(CHUNK, "big"))
    return b"".join(out)
