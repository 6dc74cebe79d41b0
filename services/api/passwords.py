"""Console passwords: Argon2id hashes (argon2-cffi's PasswordHasher, its RFC 9106 default parameters).

Unlike an API token, a password is chosen by a person and can be guessed: only a slow, salted hash keeps a
leaked store from giving them away. The rules are few (NIST SP 800-63B): a length, no composition rules.
"""
from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024  # hashing is slow by design: an unbounded password is a cheap way to load the API

_hasher = PasswordHasher()
# Verified against when the username is unknown or disabled, so such an answer takes as long as a wrong password.
_DUMMY_HASH = _hasher.hash("no such user: this hash only spends the time a real check takes")


def password_problem(password: str) -> str | None:
    """Why this new password is refused, or None."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"a password has at least {MIN_PASSWORD_LENGTH} characters"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"a password has at most {MAX_PASSWORD_LENGTH} characters"
    if not password.strip():
        return "a password is not only white space"
    return None


def hash_password(password: str) -> str:
    problem = password_problem(password)
    if problem:
        raise ValueError(problem)
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Does `password` match? With no hash (no such user) a dummy one is checked: the same time, always False."""
    if len(password) > MAX_PASSWORD_LENGTH:
        password = password[:MAX_PASSWORD_LENGTH + 1]  # still a mismatch, at a bounded cost
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when the hash was made with other parameters than today's (it is replaced at the next sign-in)."""
    return _hasher.check_needs_rehash(password_hash)
