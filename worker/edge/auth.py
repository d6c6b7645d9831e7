"""Who is calling: an API key (acts as service_role) or a Supabase JWT (acts as its user).

The resulting Principal is handed to ``db.api_session``, so the database judges the
request exactly as it would through PostgREST.
"""

from __future__ import annotations

import hmac
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jwt import PyJWK

from worker.edge.errors import ApiError
from worker.edge.jwks import (
    ACCEPTED_ALGORITHMS,
    SigningKeys,
    SigningKeysUnavailable,
    UnknownSigningKey,
    auth_issuer,
    jwks_url,
)

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

    API keys are compared in constant time. A JWT is verified by the algorithm its
    header names, and only by the key that goes with it:

    - ES256 or RS256: the project's signing key named by ``kid``, from the JWKS of
      ``supabase_url`` (see ``worker.edge.jwks``); ``iss`` must be the project's Auth;
    - HS256: the legacy shared ``jwt_secret`` (never a public key: no algorithm
      confusion);
    - anything else (``none`` included): refused.

    Either or both may be configured. Tokens must be unexpired. A token with an
    ``aud`` claim must carry the configured audience; user tokens must have one,
    while Supabase's legacy service_role key has none and is accepted without it
    (PostgREST behaves the same way). ``anon`` tokens are valid but may do nothing
    here: 403. When the JWKS cannot be fetched and no key held fits: 503.
    """

    def __init__(self, api_keys: Iterable[str], jwt_secret: str | None, audience: str, *,
                 supabase_url: str | None = None, jwks_timeout: float = 5.0,
                 jwks_refresh_interval: float = 30.0, jwks_max_age: float = 600.0) -> None:
        self._api_keys = [k.encode() for k in api_keys if k]
        self._jwt_secret = jwt_secret
        self._audience = audience
        self._signing_keys: SigningKeys | None = None
        self._issuer: str | None = None
        if supabase_url:
            self._signing_keys = SigningKeys(
                jwks_url(supabase_url), timeout=jwks_timeout,
                refresh_interval=jwks_refresh_interval, max_age=jwks_max_age)
            self._issuer = auth_issuer(supabase_url)

    def authenticate(self, token: str) -> Principal:
        """The Principal ``token`` stands for; ApiError 401 or 403 if none, 503 if the
        project's signing keys cannot be fetched to tell.

        May fetch the JWKS, which blocks: call it from a worker thread.
        """
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
        if not self._jwt_secret and self._signing_keys is None:
            raise _unauthorized("Not a valid API key (neither SUPABASE_URL nor "
                                "SUPABASE_JWT_SECRET is set to check JWTs).")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _unauthorized("Not a valid API key or JWT.") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            algorithm = None  # refused below, like any algorithm not accepted
        key: PyJWK | str
        if algorithm == "HS256" and self._jwt_secret:
            key, issuer = self._jwt_secret, None
        elif algorithm in ACCEPTED_ALGORITHMS and self._signing_keys is not None:
            key, issuer = self._signing_key(header), self._issuer
            if key.algorithm_name != algorithm:
                raise _unauthorized(f"The token says {algorithm}, but its signing key is "
                                    f"{key.algorithm_name}.")
        else:
            accepted = sorted(ACCEPTED_ALGORITHMS) if self._signing_keys else []
            accepted += ["HS256"] if self._jwt_secret else []
            raise _unauthorized("Not a valid API key, or a JWT with an algorithm this edge "
                                f"does not accept (it accepts {', '.join(accepted)}).")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                leeway=JWT_LEEWAY_SECONDS,
                issuer=issuer,
                # The audience is checked below: it may be absent on service tokens.
                options={"require": ["exp", "iss"] if issuer else ["exp"],
                         "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("The token has expired.") from None
        except (jwt.InvalidIssuerError, jwt.MissingRequiredClaimError) as exc:
            if issuer and (isinstance(exc, jwt.InvalidIssuerError) or exc.claim == "iss"):
                raise _unauthorized(f"The token's issuer is not {issuer!r}.") from None
            raise _unauthorized("Not a valid API key or JWT.") from None
        except jwt.InvalidTokenError:
            raise _unauthorized("Not a valid API key or JWT.") from None
        audience = claims.get("aud")
        if audience is not None:
            audiences = audience if isinstance(audience, list) else [audience]
            if self._audience not in audiences:
                raise _unauthorized(f"The token's audience is not {self._audience!r}.")
        return claims

    def _signing_key(self, header: Mapping[str, Any]) -> PyJWK:
        """The project's key named by the token's ``kid``: 401 if there is none, 503 if
        the JWKS cannot be fetched to tell."""
        assert self._signing_keys is not None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _unauthorized("The token names no signing key (kid).")
        try:
            return self._signing_keys.key(kid)
        except UnknownSigningKey:
            raise _unauthorized("The token's signing key is not one of the project's.") from None
        except SigningKeysUnavailable as exc:
            raise ApiError(
                503, "auth_unavailable",
                "Supabase Auth's signing keys (JWKS) cannot be fetched to verify this token; "
                "retry later.",
                headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))},
            ) from None


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
    """FastAPI dependency: the authenticated caller, or 401/403 (503: Auth's keys unknown).

    A plain function on purpose: FastAPI runs it in its threadpool, so fetching the
    JWKS never blocks the event loop, for async routes (``/events``) too.
    """
    if credentials is None:
        raise _unauthorized("Send Authorization: Bearer <API key or Supabase JWT>.")
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator.authenticate(credentials.credentials)


Caller = Annotated[Principal, Depends(principal)]
