"""What the server holds between requests: settings, gateway, accounting, keys, metrics.

The accounting backends may be down when the server starts, or go down later.
Requests then fail closed with a 503 naming the backend, and the server keeps
trying: :meth:`AppState.ready` reopens at most once a second, so service
resumes by itself when Redis or PostgreSQL come back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from conclave.api.keys import KeyStore, open_key_store
from conclave.config import Settings
from conclave.errors import BackendUnavailable, ConclaveError
from conclave.gateway import Gateway
from conclave.telemetry.metrics import Metrics

log = logging.getLogger("conclave.api")


class AppState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.gateway = Gateway(settings)
        self.accounting: Any = None
        self.keys: KeyStore | None = None
        self.bus: Any = None
        self.draining = False
        self._open_lock = asyncio.Lock()
        self._last_attempt = 0.0
        self._last_error: ConclaveError | None = None
        self._key_count: tuple[float, int] = (0.0, -1)

    async def _alert(self, alert: Any) -> None:
        """Budget alerts go out as a structured log line and a ``budget.alert`` bus event."""
        data = alert.model_dump(mode="json")
        log.warning("budget alert: %s", alert.message(), extra={"alert": data})
        if self.bus is not None:
            try:
                await self.bus.publish("budget.alert", {**data, "message": alert.message()},
                                       type="budget.alert")
            except ConclaveError as exc:
                log.warning("budget alert not published on the bus: %s", exc)

    async def ready(self) -> None:
        """Open the backends if they are not open; raise BackendUnavailable if they can't be."""
        if self.accounting is not None and self.keys is not None:
            return
        async with self._open_lock:
            if self.accounting is not None and self.keys is not None:
                return
            if time.monotonic() - self._last_attempt < 1.0 and self._last_error is not None:
                raise self._last_error
            self._last_attempt = time.monotonic()
            try:
                if self.accounting is None:
                    from conclave.accounting import open_accounting

                    self.accounting = await open_accounting(self.settings,
                                                            alert_hooks=[self._alert])
                    self.gateway.accounting = self.accounting
                if self.keys is None:
                    self.keys = await open_key_store(self.settings)
                if self.bus is None:
                    from conclave.bus import open_bus

                    self.bus = await open_bus(self.settings)
            except ConclaveError as exc:
                self._last_error = exc
                raise
            except Exception as exc:  # a driver error that was not mapped: still a 503
                self._last_error = BackendUnavailable(
                    f"accounting backends are unavailable: {type(exc).__name__}",
                    backend="accounting")
                raise self._last_error from None
            self._last_error = None

    async def active_keys(self) -> int:
        """Count of active keys, cached like key lookups (auth mode "auto" asks per request)."""
        at, n = self._key_count
        ttl = self.settings.api.key_cache_ttl_s
        if n >= 0 and time.monotonic() - at < ttl:
            return n
        assert self.keys is not None
        n = await self.keys.count_active()
        self._key_count = (time.monotonic(), n)
        return n

    def forget_key_count(self) -> None:
        self._key_count = (0.0, -1)

    async def aclose(self) -> None:
        await self.gateway.aclose()
        if self.keys is not None:
            await self.keys.aclose()
        if self.accounting is not None:
            await self.accounting.aclose()
        if self.bus is not None:
            await self.bus.aclose()
