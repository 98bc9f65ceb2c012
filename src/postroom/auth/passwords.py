"""Password hashing with argon2id (RFC 9106), via argon2-cffi.

Invariants: only hashes are stored; verification is constant-time in the library; a hash made with older
parameters is reported by :func:`needs_rehash` so the caller can upgrade it after a successful login.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# RFC 9106 §4 second recommended option, scaled to a mail server's login rate: 64 MiB, 3 passes.
_HASHER = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=1)

#: A hash of a random password, verified for unknown users so they cost as much as known ones.
DUMMY_HASH = _HASHER.hash("postroom-no-such-user-\x00")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    try:
        return _HASHER.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True
