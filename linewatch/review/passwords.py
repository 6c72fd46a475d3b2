"""Operators' names and passwords: the name rule, scrypt hashes, and session-token hashes.

Only hashes are stored: a password as salted scrypt, a session token as SHA-256 (it is
random and long, so a fast hash is enough). An unknown name is checked against a dummy
hash so that a sign-in takes as long whether or not the name exists.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets

OPERATOR = re.compile(r"[A-Za-z0-9 ._@-]{1,64}")
OPERATOR_RULE = "1-64 letters, digits, spaces and . _ @ -"
MIN_PASSWORD_CHARS = 10
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def password_matches(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                             p=int(p), dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), digest)


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@functools.cache
def unknown_operator_hash() -> str:
    """Compared against for unknown names, so they take as long as known ones."""
    return hash_password(secrets.token_hex(16))
