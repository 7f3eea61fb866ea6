"""Bearer-token checks shared by HTTP and gRPC (constant-time compare; the token is never logged)."""

from __future__ import annotations

import hmac

SCHEME = "bearer "


def bearer_ok(header: str | None, token: str | None) -> bool:
    """True when auth is off (token None) or the Authorization header carries the token."""
    if token is None:
        return True
    if not header or not header[: len(SCHEME)].lower() == SCHEME:
        return False
    return hmac.compare_digest(header[len(SCHEME) :].strip().encode(), token.encode())
