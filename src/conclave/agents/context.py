"""One agent run: its id, its budget, its bus, and the tally of what it spent.

Every agent of a run shares one :class:`RunContext`.  It is where the run's
budget lives (a ``run``-scope budget in the accounting store, enforced by the
gateway's atomic reservation, so a run cannot overspend even with agents in
several processes), where every step is counted, and how steps reach the bus.

Once a step is refused for budget the context is *stopped*: later steps are
not even attempted, and every agent ends with ``stopped_by="budget"``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any, TypeVar

from conclave.accounting._common import micros_from_usd
from conclave.agents.events import StepRecord, check_run_id, new_run_id, topic
from conclave.bus import Event, EventBus, MemoryBus
from conclave.errors import BudgetAlreadyExists, ConclaveError, InvalidRequest
from conclave.gateway import Gateway
from conclave.llm.types import Usage

log = logging.getLogger("conclave.agents")
T = TypeVar("T")

#: called with (agent name, step number, text delta) as output streams
DeltaCallback = Callable[[str, int, str], Awaitable[None] | None]
#: called with every event the run publishes (topic suffix, payload)
EventCallback = Callable[[str, Mapping[str, Any]], Awaitable[None] | None]


async def gather_all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Like ``asyncio.gather``, but the first failure cancels the others before it is raised.

    A step refused for budget must not leave its sibling samples running (and spending).
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return []
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception()), None)
    if failed is not None:
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        raise failed.exception()  # type: ignore[misc]
    return [t.result() for t in tasks]


class RunStopped(ConclaveError):
    """The run was stopped (its budget is spent, or it was cancelled): no more steps."""

    code = "run_stopped"
    http_status = 409

    def __init__(self, message: str, *, stopped_by: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.stopped_by = stopped_by


class RunContext:
    """Shared state of one run.

    Args:
        gateway: the one door to models (with accounting, steps land in the ledger).
        bus: where step, delta and coordination events go; an in-process bus if None.
        run_id: given or generated; becomes the ``run_id`` of every ledger record.
        workflow: the ``workflow_id`` ledger field (e.g. ``team``, ``humaneval``).
        privacy: force privacy mode for every call of the run (None: the setting).
        on_delta / on_event: callbacks for a UI (the CLI prints progress with them).
        delta_interval_s: deltas are coalesced into one bus event per interval, so a
            remote bus is not sent one message per token (callbacks get every delta).
    """

    def __init__(
        self,
        gateway: Gateway,
        bus: EventBus | None = None,
        *,
        run_id: str | None = None,
        workflow: str = "agents",
        privacy: bool | None = None,
        on_delta: DeltaCallback | None = None,
        on_event: EventCallback | None = None,
        publish_deltas: bool = True,
        delta_interval_s: float = 0.1,
    ) -> None:
        self.gateway = gateway
        self._own_bus = bus is None
        self.bus: EventBus = bus if bus is not None else MemoryBus(gateway.settings.bus)
        self.run_id = check_run_id(run_id) if run_id else new_run_id()
        self.workflow = workflow
        self.privacy = privacy
        self.on_delta = on_delta
        self.on_event = on_event
        self.publish_deltas = publish_deltas
        self.delta_interval_s = delta_interval_s
        self.steps: list[StepRecord] = []
        self.budget_micros: int | None = None
        self.stopped_by: str | None = None
        self.stop_reason: str | None = None
        self.started = time.perf_counter()
        self._counter = 0
        self._agent_steps: dict[str, int] = {}

    # -- budget -----------------------------------------------------------------------

    async def set_budget(self, usd: Decimal | str | int) -> None:
        """Create (or raise) the run's lifetime budget in the accounting store.

        The gateway reserves every call against it through the ``run_id`` in the
        request metadata, so the limit holds atomically, across processes.
        """
        from conclave.accounting import BudgetSpec, BudgetUpdate, ScopeRef

        try:
            micros = micros_from_usd(usd if not isinstance(usd, float) else str(usd))
        except (ValueError, ArithmeticError):
            raise InvalidRequest(f"invalid budget {usd!r}",
                                 hint="give dollars with at most 6 decimals, e.g. 0.50") from None
        if micros <= 0:
            raise InvalidRequest(f"the run budget must be positive, got ${usd}",
                                 hint="e.g. --budget 0.50")
        acc = self.gateway.accounting
        if acc is None:
            raise InvalidRequest(
                "a run budget needs accounting, and this gateway has none",
                hint="build the Gateway with accounting=await open_accounting(settings)")
        spec = BudgetSpec(scope="run", scope_id=self.run_id, period="lifetime",
                          limit_micros=micros, name=f"agent run {self.run_id}")
        try:
            await acc.budgets.create(spec)
        except BudgetAlreadyExists:
            for b in await acc.budgets.list_budgets(ScopeRef(scope="run", id=self.run_id)):
                await acc.budgets.update(b.id, BudgetUpdate(limit_micros=micros))
        self.budget_micros = micros

    # -- steps ------------------------------------------------------------------------

    def metadata(self, agent: str, operation: str, **extra: str) -> dict[str, str]:
        """Request metadata: caller fields the ledger files, the rest become attributes."""
        return {"run_id": self.run_id, "workflow_id": self.workflow,
                "operation": operation, "agent": agent, **extra}

    def next_step(self, agent: str) -> tuple[int, int]:
        """Reserve the next run-wide and per-agent step numbers."""
        self._counter += 1
        n = self._agent_steps.get(agent, 0) + 1
        self._agent_steps[agent] = n
        return self._counter, n

    async def record(self, step: StepRecord) -> None:
        """Count a finished step and publish it as ``agents.<run>.<agent>.step``."""
        self.steps.append(step)
        await self.publish(f"{step.agent}.step", step.model_dump(mode="json"))

    def merge(self, steps: list[StepRecord]) -> None:
        """Add steps another process reported (by id: steps already known are skipped)."""
        known = {s.id for s in self.steps}
        self.steps.extend(s for s in steps if s.id not in known)

    def check(self) -> None:
        """Raise :class:`RunStopped` once the run was stopped."""
        if self.stopped_by is not None:
            raise RunStopped(f"the run is stopped ({self.stopped_by}): {self.stop_reason}",
                             stopped_by=self.stopped_by)

    def stop(self, by: str, reason: str) -> None:
        if self.stopped_by is None:
            self.stopped_by, self.stop_reason = by, reason

    # -- totals -----------------------------------------------------------------------

    @property
    def usage(self) -> Usage:
        u = Usage()
        for s in self.steps:
            u.input_tokens += s.input_tokens
            u.output_tokens += s.output_tokens
            u.estimated = u.estimated or s.tokens_estimated
        return u

    @property
    def cost_micros(self) -> int:
        return sum(s.cost_micros for s in self.steps)

    # -- events -----------------------------------------------------------------------

    def topic(self, *parts: str) -> str:
        return topic(self.run_id, *parts)

    async def publish(self, suffix: str, payload: Mapping[str, Any], *,
                      type: str = "event") -> Event | None:
        """Publish ``agents.<run>.<suffix>``; a bus failure is logged, never fatal to the run."""
        if self.on_event is not None:
            res = self.on_event(suffix, payload)
            if asyncio.iscoroutine(res):
                await res
        try:
            return await self.bus.publish(self.topic(*suffix.split(".")), dict(payload),
                                          type=type)
        except ConclaveError as exc:
            log.warning("agents: could not publish %s for run %s: %s", suffix, self.run_id, exc)
            return None

    async def delta(self, agent: str, step: int, text: str) -> None:
        if self.on_delta is not None:
            res = self.on_delta(agent, step, text)
            if asyncio.iscoroutine(res):
                await res

    async def aclose(self) -> None:
        """Close the bus if this context created it."""
        if self._own_bus:
            await self.bus.aclose()
