"""The invocation ledger: one record per gateway call, written in batches.

Every call through the gateway - success, error, cancelled, or a stream the
client cut - becomes one :class:`InvocationRecord`.  Fields follow the
OpenTelemetry GenAI semantic conventions where one exists
(:data:`OTEL_ATTRIBUTES`), so the ledger, traces and metrics speak the same
names.

Column names.  Where a field has an OTel name, its database column is that
name with dots turned into underscores (``gen_ai.usage.input_tokens`` ->
``gen_ai_usage_input_tokens``); other columns are plain snake_case
(``cost_micros``).  Dotted names would have to be double-quoted in every SQL
statement and break tools that map columns to identifiers (pandas, BI tools,
ORMs); dot-to-underscore is the same flattening the OpenTelemetry Prometheus
exporter applies, so a reader recognises the attribute at once.  Python
attribute names stay short (``record.input_tokens``); :data:`COLUMNS` maps them.

Writes are asynchronous and batched (:class:`BatchingLedger`): ``write`` puts
the record in memory and returns; a background task writes every
``flush_interval`` or as soon as ``batch_size`` records wait, one transaction
per batch, idempotent by record id.  ``flush()`` waits until everything
written before it is durable; ``aclose()`` drains everything, and when the
backend is down at shutdown it saves the remainder to a spill file that the
next ``open`` replays, so a SIGTERM never loses a record.  The API server calls
``aclose()`` from its lifespan shutdown (uvicorn turns SIGTERM into that);
plain scripts use :func:`install_signal_flush`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from conclave.accounting._common import MAX_MICROS, as_utc
from conclave.errors import BackendUnavailable, ConclaveError

log = logging.getLogger("conclave.accounting.ledger")


class Outcome(StrEnum):
    SUCCESS = "success"
    ERROR = "error"
    #: the caller or a stop policy ended the call
    CANCELLED = "cancelled"
    #: the client disconnected mid-stream; billed for what was consumed
    CUT = "cut"


#: Python field -> OpenTelemetry attribute name (only fields that have one)
OTEL_ATTRIBUTES: dict[str, str] = {
    "operation": "gen_ai.operation.name",
    "provider": "gen_ai.provider.name",
    "request_model": "gen_ai.request.model",
    "response_model": "gen_ai.response.model",
    "response_id": "gen_ai.response.id",
    "max_tokens": "gen_ai.request.max_tokens",
    "finish_reasons": "gen_ai.response.finish_reasons",
    "input_tokens": "gen_ai.usage.input_tokens",
    "output_tokens": "gen_ai.usage.output_tokens",
    "cached_input_tokens": "gen_ai.usage.cache_read.input_tokens",
    "cache_write_tokens": "gen_ai.usage.cache_creation.input_tokens",
    "error_type": "error.type",
    "user": "user.id",
    "route": "http.route",
}


class InvocationRecord(BaseModel):
    """One gateway call.  Money in integer micro-dollars; times aware and stored in UTC."""

    model_config = ConfigDict(extra="forbid")

    id: UUID = Field(default_factory=uuid4)
    started_at: datetime
    ended_at: datetime
    #: gen_ai.operation.name: chat, text_completion, embeddings, ...
    operation: str = "chat"
    #: None when the call was refused before a provider was chosen
    provider: str | None = None
    request_model: str | None = None
    response_model: str | None = None
    response_id: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    finish_reasons: list[str] = Field(default_factory=list)
    tier: int | None = Field(None, ge=0, le=3)
    #: the call ran under privacy mode (local providers only)
    privacy: bool = False
    input_tokens: int = Field(0, ge=0)
    output_tokens: int = Field(0, ge=0)
    cached_input_tokens: int = Field(0, ge=0)
    cache_write_tokens: int = Field(0, ge=0)
    #: some count was computed by Conclave because the provider reported none
    tokens_estimated: bool = False
    cost_micros: int = Field(0, ge=0, le=MAX_MICROS)
    #: defaults to ended_at - started_at
    latency_ms: int | None = Field(None, ge=0)
    #: time to first token, streams only
    ttft_ms: int | None = Field(None, ge=0)
    outcome: Outcome
    #: error.type: the error code (``rate_limited``, ``budget_exceeded``...) or class name
    error_type: str | None = None
    api_key_id: str | None = None
    user: str | None = None
    team: str | None = None
    run_id: str | None = None
    workflow_id: str | None = None
    experiment: str | None = None
    variant: str | None = None
    #: http.route of the API call (``/v1/chat/completions``), None for library calls
    route: str | None = None
    #: free-form labels (ChatRequest.metadata); never prompts or secrets
    attributes: dict[str, str] = Field(default_factory=dict)

    @field_validator("started_at", "ended_at")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return as_utc(v)

    @model_validator(mode="after")
    def _derived(self) -> InvocationRecord:
        for field in type(self).model_fields:
            value = getattr(self, field)
            texts = value if isinstance(value, list) else (
                [*value, *value.values()] if isinstance(value, dict) else [value])
            if any(isinstance(t, str) and "\x00" in t for t in texts):
                # PostgreSQL text cannot hold NUL; refuse it on every backend alike
                raise ValueError(f"{field} contains a NUL character")
        if self.ended_at < self.started_at:
            raise ValueError("ended_at is before started_at")
        if self.latency_ms is None:
            delta = self.ended_at - self.started_at
            self.latency_ms = delta // _MS
        return self

    def otel_attributes(self) -> dict[str, Any]:
        """The record under OpenTelemetry attribute names (None values left out)."""
        out: dict[str, Any] = {}
        for field, name in OTEL_ATTRIBUTES.items():
            value = getattr(self, field)
            if value is not None and value != []:
                out[name] = value
        return out


_MS = timedelta(milliseconds=1)


def column_name(field: str) -> str:
    """Database column of a record field: the OTel name flattened, else the field name."""
    if field == "id":
        return "id"
    otel = OTEL_ATTRIBUTES.get(field)
    return otel.replace(".", "_") if otel else field


#: Python field -> database column, in table order
COLUMNS: dict[str, str] = {f: column_name(f) for f in InvocationRecord.model_fields}


class LedgerQuery(BaseModel):
    """Filters for ``list_records``/``count``/``spend``: time range on started_at, half-open."""

    model_config = ConfigDict(extra="forbid")

    since: datetime | None = None
    until: datetime | None = None
    provider: str | None = None
    request_model: str | None = None
    response_model: str | None = None
    operation: str | None = None
    outcome: Outcome | None = None
    api_key_id: str | None = None
    user: str | None = None
    team: str | None = None
    run_id: str | None = None
    workflow_id: str | None = None
    experiment: str | None = None
    variant: str | None = None
    route: str | None = None
    limit: int = Field(100, ge=1, le=100_000)
    offset: int = Field(0, ge=0)

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return None if v is None else as_utc(v)

    def equality_filters(self) -> list[tuple[str, Any]]:
        """(column, value) pairs for the equality filters that are set."""
        out = []
        for field in (
            "provider", "request_model", "response_model", "operation", "outcome", "api_key_id",
            "user", "team", "run_id", "workflow_id", "experiment", "variant", "route",
        ):
            value = getattr(self, field)
            if value is not None:
                out.append((COLUMNS[field], str(value)))
        return out


SpendGroup = Literal[
    "provider", "model", "api_key", "user", "team", "day", "run", "outcome", "experiment",
    "variant", "route",
]

#: spend group -> SQL expression (``day`` is backend specific)
GROUP_COLUMNS: dict[str, str] = {
    "provider": COLUMNS["provider"],
    # the model that answered, or the one asked for when none answered
    "model": f"COALESCE({COLUMNS['response_model']}, {COLUMNS['request_model']})",
    "api_key": COLUMNS["api_key_id"],
    "user": COLUMNS["user"],
    "team": COLUMNS["team"],
    "run": COLUMNS["run_id"],
    "outcome": COLUMNS["outcome"],
    "experiment": COLUMNS["experiment"],
    "variant": COLUMNS["variant"],
    "route": COLUMNS["route"],
}


class SpendRow(BaseModel):
    """One group of a spend breakdown.  Latency percentiles are nearest-rank."""

    key: str | None
    count: int
    cost_micros: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    p50_latency_ms: int | None = None
    p95_latency_ms: int | None = None


def sort_spend(by: str, rows: list[SpendRow]) -> list[SpendRow]:
    """Days in calendar order; every other grouping by cost, highest first."""
    if by == "day":
        return sorted(rows, key=lambda r: r.key or "")
    return sorted(rows, key=lambda r: (-r.cost_micros, r.key or ""))


@runtime_checkable
class Ledger(Protocol):
    """Where invocation records go.  Implementations: SQLite (embedded), PostgreSQL."""

    async def write(self, record: InvocationRecord) -> None:
        """Accept a record for the next batch; returns at once."""

    def ensure_available(self) -> None:
        """Raise BackendUnavailable while writes are failing: the gateway calls this before a
        call so it fails closed instead of running calls it cannot record."""

    async def flush(self) -> None:
        """Wait until every record accepted so far is durable (BackendUnavailable if not)."""

    async def aclose(self) -> None:
        """Drain everything (spilling to disk if the backend is down), then close."""

    async def ping(self) -> None: ...

    async def get(self, record_id: UUID) -> InvocationRecord | None: ...

    async def count(self, query: LedgerQuery | None = None) -> int: ...

    async def list_records(self, query: LedgerQuery | None = None) -> list[InvocationRecord]:
        """Newest first."""

    async def spend(self, by: SpendGroup, query: LedgerQuery | None = None) -> list[SpendRow]:
        """Sum of cost and tokens, count and latency percentiles per group."""


# --- the batching writer shared by the backends ----------------------------------------


class BatchingLedger(ABC):
    """Queue + background flush task; subclasses write a batch in one transaction."""

    #: "SQLite", "PostgreSQL": used in error messages
    backend_name: str = "ledger"

    def __init__(
        self,
        *,
        flush_interval_s: float = 0.05,
        batch_size: int = 500,
        max_pending: int = 200_000,
        spill_dir: Path | None = None,
        close_timeout_s: float = 10.0,
    ) -> None:
        self._interval = flush_interval_s
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._spill_dir = spill_dir
        self._close_timeout = close_timeout_s
        self._pending: deque[InvocationRecord] = deque()
        self._enqueued = 0
        self._written = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._has_work = asyncio.Event()
        self._urge = asyncio.Event()
        self._failure: BackendUnavailable | None = None
        self._closing = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    # -- subclass hooks ----------------------------------------------------------------

    @abstractmethod
    async def _write_batch(self, records: Sequence[InvocationRecord]) -> None:
        """Write all of them in one transaction, ignoring ids already present.  Raise
        BackendUnavailable for an outage (the batch is retried); any other error means the
        data was refused (the bad records are set aside)."""

    @abstractmethod
    async def _close_backend(self) -> None: ...


    # -- lifecycle -------------------------------------------------------------------

    async def _start(self) -> None:
        """Replay spill files from an earlier shutdown, then start the writer task."""
        await self._replay_spill()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"conclave-ledger-writer-{self.backend_name}"
        )

    async def write(self, record: InvocationRecord) -> None:
        if self._closing:
            raise ConclaveError(
                "the ledger is closed", hint="open a new ledger; this one was shut down"
            )
        if len(self._pending) >= self._max_pending:
            raise self._failure or BackendUnavailable(
                f"the ledger has {len(self._pending)} unwritten records",
                backend=self.backend_name,
                hint="the backend is too slow or down; requests are refused until it catches up",
            )
        self._pending.append(record)
        self._enqueued += 1
        self._has_work.set()
        if len(self._pending) >= self._batch_size:
            self._urge.set()

    def ensure_available(self) -> None:
        if self._failure is not None:
            raise self._failure

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        target = self._enqueued
        if self._written >= target:
            return
        if self._task is None or self._task.done():
            raise ConclaveError("the ledger writer is not running", hint="open the ledger first")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._has_work.set()
        self._urge.set()
        await fut

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closing = True
        deadline = time.monotonic() + self._close_timeout
        last: BackendUnavailable | None = None
        while self._pending and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.flush(), max(0.01, deadline - time.monotonic()))
            except BackendUnavailable as exc:
                last = exc
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            except (TimeoutError, ConclaveError):
                break  # out of time, or the writer is gone: spill what is left
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._closed = True
        leftover = list(self._pending)
        self._pending.clear()
        try:
            if leftover:
                path = self._spill(leftover)
                if path is None:
                    raise last or BackendUnavailable(
                        f"{len(leftover)} ledger records could not be written at shutdown",
                        backend=self.backend_name,
                        hint="set accounting.ledger_spill_dir so they are kept on disk",
                    )
                log.warning(
                    "ledger backend unavailable at shutdown; records spilled to disk",
                    extra={"conclave_event": {"spilled": len(leftover), "path": str(path)}},
                )
        finally:
            await self._close_backend()

    # -- the writer --------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._interval
        while True:
            await self._has_work.wait()
            if not self._pending:
                self._has_work.clear()
                continue
            if len(self._pending) < self._batch_size and not self._urge.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urge.wait(), self._interval)
            self._urge.clear()
            while self._pending:
                batch = [self._pending[i] for i in range(min(len(self._pending), self._batch_size))]
                try:
                    await self._write_batch(batch)
                except asyncio.CancelledError:
                    raise
                except BackendUnavailable as exc:
                    # an outage: keep the batch, refuse new calls, retry with backoff
                    self._failure = exc
                    log.warning(
                        "ledger write failed; will retry",
                        extra={"conclave_event": {"pending": len(self._pending),
                                                  "error": exc.message}},
                    )
                    self._fail_waiters(exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                except Exception as exc:
                    # the database refused the data itself: retrying the same batch would
                    # block the ledger forever, so find the bad records and set them aside
                    try:
                        await self._isolate(batch, exc)
                    except BackendUnavailable as outage:
                        self._failure = outage
                        self._fail_waiters(outage)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 2.0)
                        continue
                for _ in batch:
                    self._pending.popleft()
                self._written += len(batch)
                self._failure = None
                backoff = self._interval
                self._wake_waiters()

    async def _isolate(self, batch: list[InvocationRecord], exc: Exception) -> None:
        """Write the batch one record at a time; records the database rejects go to a
        ``rejected-*.jsonl`` file beside the spill files (never silently dropped)."""
        rejected: list[InvocationRecord] = []
        for record in batch:
            try:
                await self._write_batch([record])
            except BackendUnavailable:
                raise
            except Exception:
                rejected.append(record)
        if rejected:
            path = self._spill(rejected, kind="rejected")
            log.error(
                "ledger rejected %d record(s): %s", len(rejected), type(exc).__name__,
                extra={"conclave_event": {"rejected": [str(r.id) for r in rejected],
                                          "saved_to": str(path) if path else None}},
            )

    def _wake_waiters(self) -> None:
        keep = []
        for target, fut in self._waiters:
            if fut.done():
                continue
            if self._written >= target:
                fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    def _fail_waiters(self, exc: BackendUnavailable) -> None:
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(exc)
        self._waiters = []

    # -- spill files -------------------------------------------------------------------

    def _spill(self, records: list[InvocationRecord], kind: str = "spill") -> Path | None:
        if self._spill_dir is None:
            return None
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        name = f"{kind}-{time.time_ns()}-{os.getpid()}.jsonl"
        tmp = self._spill_dir / f".{name}.tmp"
        with tmp.open("w") as fh:
            for r in records:
                fh.write(r.model_dump_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        path = self._spill_dir / name
        tmp.rename(path)
        return path

    async def _replay_spill(self) -> None:
        if self._spill_dir is None or not self._spill_dir.is_dir():
            return
        for path in sorted(self._spill_dir.glob("spill-*.jsonl")):
            records = [
                InvocationRecord.model_validate(json.loads(line))
                for line in path.read_text().splitlines()
                if line.strip()
            ]
            for i in range(0, len(records), self._batch_size):
                await self._write_batch(records[i : i + self._batch_size])
            path.unlink()
            log.info(
                "replayed spilled ledger records",
                extra={"conclave_event": {"records": len(records), "path": str(path)}},
            )


# --- signals ---------------------------------------------------------------------------


class _Closable(Protocol):
    async def aclose(self) -> None: ...


def install_signal_flush(
    *closables: _Closable,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> Callable[[], None]:
    """On SIGTERM/SIGINT, ``aclose()`` each closable (draining the ledger), then die by the
    same signal so the exit status stays truthful.  Returns a function that uninstalls.

    For scripts and workers.  The API server does not need it: uvicorn turns SIGTERM into
    the lifespan shutdown, which calls ``Accounting.aclose()``.
    """
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def uninstall() -> None:
        for s in signals:
            loop.remove_signal_handler(s)

    async def shutdown(sig: signal.Signals) -> None:
        for closable in closables:
            try:
                await closable.aclose()
            except Exception:
                log.exception("error while closing on %s", sig.name)
        uninstall()
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)

    def handler(sig: signal.Signals) -> None:
        if tasks:
            return  # already shutting down
        task = loop.create_task(shutdown(sig))
        tasks.add(task)

    for s in signals:
        loop.add_signal_handler(s, handler, s)
    return uninstall
