"""Who is calling: an API key (``Authorization: Bearer ck-...``) or, before any key
exists, a loopback client (auth mode "auto")."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fastapi import Request

from conclave.api.keys import ApiKey
from conclave.api.state import AppState
from conclave.errors import ConclaveError


class Unauthorized(ConclaveError):
    code = "unauthorized"
    http_status = 401


class Forbidden(ConclaveError):
    code = "forbidden"
    http_status = 403


@dataclass(frozen=True)
class Caller:
    key: ApiKey | None
    admin: bool

    @property
    def key_id(self) -> str:
        return self.key.id if self.key else "anonymous"


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def authenticate(request: Request, state: AppState) -> Caller:
    mode = state.settings.api.auth
    header = request.headers.get("authorization", "")
    if mode == "off":
        return Caller(key=None, admin=True)
    await state.ready()
    assert state.keys is not None
    if header.lower().startswith("bearer "):
        key = await state.keys.lookup(header[7:].strip())
        if key is None:
            raise Unauthorized("invalid or revoked API key",
                               hint="create one with `conclave keys create`")
        return Caller(key=key, admin=key.scope == "admin")
    if mode == "auto" and _loopback(request) and await state.active_keys() == 0:
        return Caller(key=None, admin=True)
    raise Unauthorized("an API key is required (Authorization: Bearer ck-...)",
                       hint="create one with `conclave keys create`")


def require_admin(caller: Caller) -> None:
    if not caller.admin:
        raise Forbidden("this endpoint needs an admin key",
                        hint="create one with `conclave keys create --admin`")
