"""The team with its roles behind NATS JetStream: the orchestrator and the workers hold
separate connections (as separate processes would) and share only the bus."""

from __future__ import annotations

import contextlib
import uuid

import nats
import pytest

from conclave.agents import Coder, Planner, Reviewer, Team, serve_roles
from conclave.bus import open_bus
from conclave.bus.nats import stream_name_for
from conclave.config import BusSettings
from conclave.llm.types import ChatRequest
from tests.agents._scripted import BASE, Collector, scripted_gateway, scripted_settings
from tests.agents.test_team import TASK, pipeline_responder

pytestmark = pytest.mark.integration

NATS_URL = "nats://127.0.0.1:4222"


async def test_team_over_nats_with_remote_roles(tmp_path):
    bus_settings = BusSettings(backend="nats", nats_url=NATS_URL,
                               prefix=f"t{uuid.uuid4().hex[:12]}", request_timeout_s=30)
    log: list[tuple[str, ChatRequest]] = []
    settings = scripted_settings(tmp_path)
    gw, _ = scripted_gateway(settings, pipeline_responder(log))
    worker_bus = await open_bus(bus_settings)
    team_bus = await open_bus(bus_settings)
    try:
        await serve_roles(gw, worker_bus, planner=Planner(model=BASE),
                          coder=Coder(model=BASE, samples=3, shapes=("free",)),
                          reviewer=Reviewer(model=BASE))
        watcher = Collector(lambda evs: any(e.topic.endswith("team.done") for e in evs))
        await team_bus.subscribe("agents.run-nats.>", watcher)
        result = await Team(gw, team_bus, max_rounds=3, serve_locally=False).run(
            TASK, run_id="run-nats")
        assert result.approved and result.rounds == 2
        assert result.steps == 7 and result.cost_micros == 7 * 200
        topics = {e.topic for e in await watcher.wait(within=10)}
        assert {"agents.run-nats.coder.step", "agents.run-nats.planner.plan",
                "agents.run-nats.team.round"} <= topics
    finally:
        await team_bus.aclose()
        await worker_bus.aclose()
        nc = await nats.connect(NATS_URL)
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream_name_for(bus_settings))
        await nc.close()
