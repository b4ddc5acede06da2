"""The shared token: where it comes from (an argument, else ``$COACH_TOKEN``; never a
command line, which any user can read in ``ps``) and how long it must be. The TCP link proves
it in its handshake and keys its message tags from it; a plan directory's manifest is signed
with it.

Example::

    >>> shared_token("0123456789abcdef-secret")
    b'0123456789abcdef-secret'
    >>> shared_token("short")
    Traceback (most recent call last):
    ...
    coach_fx.runtime.links.credentials.AuthError: the shared token has 5 bytes; use at least 16 ...
"""

from __future__ import annotations

import os

from coach_fx.runtime.links.base import LinkError

#: The shortest shared token accepted (e.g. ``openssl rand -hex 16`` gives 32 characters).
MIN_TOKEN_BYTES = 16
#: Where a token comes from when none is passed (never the command line: see ``--token-file``).
TOKEN_ENV = "COACH_TOKEN"


class AuthError(LinkError):
    """The peer could not prove it holds the shared token (or spoke another protocol), or
    this side has no usable token."""


def shared_token(token: bytes | str | None, required: bool = True) -> bytes | None:
    """The shared secret as bytes: ``token``, else ``$COACH_TOKEN``; refused
    (:class:`AuthError`) when shorter than :data:`MIN_TOKEN_BYTES`; when there is none, None,
    or :class:`AuthError` when ``required``."""
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    if not token:
        if not required:
            return None
        raise AuthError(f"no shared token: pass token=... (or --token-file) or set {TOKEN_ENV}")
    key = token.encode() if isinstance(token, str) else bytes(token)
    if len(key) < MIN_TOKEN_BYTES:
        raise AuthError(f"the shared token has {len(key)} bytes; use at least {MIN_TOKEN_BYTES} "
                        "(e.g. openssl rand -hex 16): a short one can be guessed from a recorded handshake")
    return key


__all__ = ["MIN_TOKEN_BYTES", "TOKEN_ENV", "AuthError", "shared_token"]
