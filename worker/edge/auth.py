"""Who is calling: an API key (acts as service_role) or a Supabase JWT (acts as its user).

The resulting Principal is handed to ``db.api_session``, so the database judges the
request exactly as it would through PostgREST.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from worker.edge.errors import ApiError

# Seconds of clock difference tolerated between the token issuer and the edge.
JWT_LEEWAY_SECONDS = 10


@dataclass(frozen=True)
class Principal:
    """The caller as the database sees it: an API role and its JWT claims."""

    role: str
    claims: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_service(self) -> bool:
        return self.role == "service_role"

    @property
    def user_id(self) -> str | None:
        """The signed-in user's id (the JWT's ``sub``, canonical form); None otherwise."""
        if self.role != "authenticated":
            return None
        return str(uuid.UUID(self.claims["sub"]))


SERVICE = Principal("service_role", {"role": "service_role"})
ANONYMOUS = Principal("anon", {"role": "anon"})


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message)


class Authenticator:
    """Turns a bearer token into a Principal, or refuses it.

    API keys are compared in constant time. JWTs must be HS256, signed with the
    project's JWT secret and unexpired. A token with an ``aud`` claim must carry the
    configured audience; user tokens must have one, while Supabase's service_role
    key has none and is accepted without it (PostgREST behaves the same way).
    ``anon`` tokens are valid but may do nothing here: 403.
    """

    def __init__(self, api_keys: Iterable[str], jwt_secret: str | None, audience: str) -> None:
        self._api_keys = [k.encode() for k in api_keys if k]
        self._jwt_secret = jwt_secret
        self._audience = audience

    def authenticate(self, token: str) -> Principal:
        """The Principal ``token`` stands for; ApiError 401 or 403 if none."""
        candidate = token.encode()
        # Every key is compared, so timing does not tell how many keys there are.
        if sum(hmac.compare_digest(candidate, key) for key in self._api_keys):
            return SERVICE
        claims = self._verify_jwt(token)
        role = claims.get("role")
        if role == "service_role":
            return Principal("service_role", claims)
        if role == "authenticated":
            if claims.get("aud") is None:
                raise _unauthorized("The token has no audience; expected a Supabase user token.")
            if not _is_uuid(claims.get("sub")):
                raise _unauthorized("The token's subject (sub) is not a user id.")
            return Principal("authenticated", claims)
        if role == "anon":
            raise ApiError(403, "forbidden", "Sign in: the anon role cannot use this API.")
        raise _unauthorized("The token's role must be authenticated or service_role.")

    def _verify_jwt(self, token: str) -> dict[str, Any]:
        if not self._jwt_secret:
            raise _unauthorized("Not a valid API key (no JWT secret is set to check JWTs).")
        try:
            claims = jwt.decode(
                token,
                self._jwt_secret,
                algorithms=["HS256"],
                leeway=JWT_LEEWAY_SECONDS,
                # The audience is checked below: it may be absent on service tokens.
                options={"require": ["exp"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("The token has expired.") from None
        except jwt.InvalidTokenError:
            raise _unauthorized("Not a valid API key or JWT.") from None
        audience = claims.get("aud")
        if audience is not None:
            audiences = audience if isinstance(audience, list) else [audience]
            if self._audience not in audiences:
                raise _unauthorized(f"The token's audience is not {self._audience!r}.")
        return claims


def _is_uuid(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


_bearer = HTTPBearer(
    auto_error=False,
    description="An API key from TASKMAN_API_KEYS, or a Supabase JWT.",
)


def principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """FastAPI dependency: the authenticated caller, or 401/403."""
    if credentials is None:
        raise _unauthorized("Send Authorization: Bearer <API key or Supabase JWT>.")
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator.authenticate(credentials.credentials)


Caller = Annotated[Principal, Depends(principal)]
