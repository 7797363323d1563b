"""The cryptographic primitives of secure aggregation, all from ``cryptography`` (OpenSSL).

- **KDF:** HKDF-SHA256 (RFC 5869). Every derived key names its purpose and both parties in
  ``info``, so one shared secret never keys two things.
- **Masks:** the full 32-byte seed goes through HKDF, then ChaCha20 (RFC 8439, zero nonce:
  every key is used for one stream only) expands it to ``d`` ring elements. Distinct seeds
  give unrelated streams; nothing is folded to 32 bits (Flower's SecAgg+ seeds numpy's
  Mersenne Twister with a 32-bit fold of the seed, so distinct seeds can collide).
- **Authenticated encryption** of secret shares: ChaCha20-Poly1305.
- **Key agreement:** X25519 (RFC 7748); the hybrid option adds ML-KEM-768 (FIPS 203) and
  feeds both shared secrets to HKDF, so a derived key stays secret unless *both* fall.

Secret keys come from ``random_bytes`` (``os.urandom`` by default, the OS CSPRNG); tests
may pass a deterministic source.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from .quantise import ring_dtype

__all__ = [
    "KEM_CIPHERTEXT_BYTES",
    "KEM_PUBLIC_BYTES",
    "KEM_SEED_BYTES",
    "KEY_AGREEMENTS",
    "AuthenticationError",
    "RandomBytes",
    "decrypt",
    "encrypt",
    "hkdf",
    "kem_decapsulate",
    "kem_encapsulate",
    "kem_keypair",
    "kem_private",
    "kem_public",
    "mask_stream",
    "x25519_keypair",
    "x25519_private",
    "x25519_shared",
]

RandomBytes = Callable[[int], bytes]
KEY_AGREEMENTS = ("x25519", "hybrid")
X25519_BYTES = 32
KEM_SEED_BYTES = 64  # an ML-KEM-768 decapsulation key in seed form (d || z)
KEM_PUBLIC_BYTES = 1184
KEM_CIPHERTEXT_BYTES = 1088
_LABEL = b"fedshield-secagg/v1 "


class AuthenticationError(ValueError):
    """A ciphertext or a key confirmation failed: tampered, or keys that do not match."""


def hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 of ``secret`` for the purpose ``info`` (no salt: inputs are uniform keys)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=_LABEL + info).derive(secret)


def mask_stream(seed: bytes, d: int, bits: int) -> NDArray[np.unsignedinteger]:
    """``(d,)`` pseudo-random elements of ``Z_{2^bits}`` from the full ``seed``.

    HKDF binds the seed to this use; ChaCha20's keystream supplies 4 bytes per element
    (8 for ``bits > 32``), reduced mod ``2^bits``.

    Examples
    --------
    >>> a = mask_stream(bytes(32), 4, 32); b = mask_stream(bytes(31) + b"\\x01", 4, 32)
    >>> a.dtype, a.shape, bool((a != b).all())
    (dtype('uint32'), (4,), True)
    """
    if len(seed) < 16:
        raise ValueError(f"a mask seed must have at least 16 bytes, got {len(seed)}")
    dtype = ring_dtype(bits)
    key = hkdf(seed, b"mask stream")
    enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    stream = np.frombuffer(enc.update(bytes(d * np.dtype(dtype).itemsize)), dtype=dtype)
    if bits in (32, 64):
        return stream
    out: NDArray[np.unsignedinteger] = stream & dtype((1 << bits) - 1)
    return out


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """ChaCha20-Poly1305 with a zero nonce (each key encrypts one message)."""
    return ChaCha20Poly1305(key).encrypt(bytes(12), plaintext, aad)


def decrypt(key: bytes, ciphertext: bytes, aad: bytes, what: str) -> bytes:
    """Inverse of :func:`encrypt`; raises :class:`AuthenticationError` naming ``what``."""
    try:
        return ChaCha20Poly1305(key).decrypt(bytes(12), ciphertext, aad)
    except InvalidTag:
        raise AuthenticationError(
            f"{what} failed authentication: the ciphertext or the key material it was derived "
            "from (a public key or a KEM ciphertext) was altered in transit"
        ) from None


@dataclass(frozen=True)
class X25519Pair:
    private: bytes
    public: bytes


def x25519_keypair(random_bytes: RandomBytes = os.urandom) -> X25519Pair:
    """A fresh X25519 key pair (32-byte raw private and public keys)."""
    sk = X25519PrivateKey.from_private_bytes(random_bytes(X25519_BYTES))
    return X25519Pair(sk.private_bytes_raw(), sk.public_key().public_bytes_raw())


def x25519_private(private: bytes) -> X25519PrivateKey:
    """The key object of a raw private key: load it once, agree with many peers."""
    return X25519PrivateKey.from_private_bytes(private)


def x25519_shared(private: bytes | X25519PrivateKey, public: bytes) -> bytes:
    """The X25519 shared secret of our ``private`` key (raw, or from :func:`x25519_private`)
    and their ``public`` key."""
    if len(public) != X25519_BYTES:
        raise ValueError(f"an X25519 public key has 32 bytes, got {len(public)}")
    sk = x25519_private(private) if isinstance(private, bytes) else private
    return sk.exchange(X25519PublicKey.from_public_bytes(public))


def kem_keypair(random_bytes: RandomBytes = os.urandom) -> tuple[bytes, bytes]:
    """``(seed, public)``: an ML-KEM-768 decapsulation key in 64-byte seed form and its
    1184-byte encapsulation key."""
    seed = random_bytes(KEM_SEED_BYTES)
    return seed, kem_public(seed)


def kem_public(seed: bytes) -> bytes:
    """The ML-KEM-768 encapsulation key of the decapsulation key ``seed``."""
    return MLKEM768PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw()


def kem_encapsulate(public: bytes) -> tuple[bytes, bytes]:
    """``(shared_secret, ciphertext)`` for the holder of ``public`` (32 B, 1088 B)."""
    if len(public) != KEM_PUBLIC_BYTES:
        raise ValueError(f"an ML-KEM-768 public key has {KEM_PUBLIC_BYTES} bytes, got {len(public)}")
    shared, ct = MLKEM768PublicKey.from_public_bytes(public).encapsulate()
    return shared, ct


def kem_private(seed: bytes) -> MLKEM768PrivateKey:
    """The decapsulation key of ``seed``, expanded once (expanding costs about three
    decapsulations, profiled here: keep it for the stage, not per ciphertext)."""
    return MLKEM768PrivateKey.from_seed_bytes(seed)


def kem_decapsulate(seed: bytes | MLKEM768PrivateKey, ciphertext: bytes) -> bytes:
    """The shared secret of ``ciphertext`` for the key ``seed`` (or :func:`kem_private`'s
    object). A tampered ciphertext does not raise here (ML-KEM rejects implicitly with a
    pseudo-random secret): callers confirm the key."""
    if len(ciphertext) != KEM_CIPHERTEXT_BYTES:
        raise AuthenticationError(
            f"an ML-KEM-768 ciphertext has {KEM_CIPHERTEXT_BYTES} bytes, got {len(ciphertext)}")
    sk = kem_private(seed) if isinstance(seed, bytes) else seed
    return sk.decapsulate(ciphertext)
