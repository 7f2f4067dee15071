"""The router's /v1/models cache without Serve: expiry, one shared load per refresh, invalidation, errors,
and the index-version check that drops it (tests/test_serve.py checks the same over HTTP after a swap).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from visuray.serving.router import SharedRefresh, shows_index_version
from visuray.serving.schemas import ModelsResponse


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Loads:
    """A load function that counts its calls and answers 1, 2, 3, ...; ``gate`` holds every call open,
    ``gates[n]`` only call n."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.gates: dict[int, asyncio.Event] = {}
        self.fail_next = False

    async def __call__(self) -> int:
        self.calls += 1
        answer = self.calls
        gate = self.gates.get(answer, self.gate)
        if gate is not None:
            await gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("a deployment is down")
        return answer


def test_value_is_reused_until_the_ttl_passes() -> None:
    async def scenario() -> None:
        clock, loads = Clock(), Loads()
        cache = SharedRefresh(loads, ttl_s=5, clock=clock)
        assert cache.peek() is None
        assert [await cache.get(), await cache.get()] == [1, 1]
        clock.now += 4.9
        assert await cache.get() == 1 and loads.calls == 1
        clock.now += 0.2  # 5.1 s after the load
        assert await cache.get() == 2 and loads.calls == 2 and cache.peek() == 2

    asyncio.run(scenario())


def test_zero_ttl_loads_on_every_get() -> None:
    async def scenario() -> None:
        loads = Loads()
        cache = SharedRefresh(loads, ttl_s=0, clock=Clock())
        assert [await cache.get() for _ in range(3)] == [1, 2, 3]

    asyncio.run(scenario())


def test_concurrent_callers_share_one_load() -> None:
    async def scenario() -> None:
        clock, loads = Clock(), Loads()
        cache = SharedRefresh(loads, ttl_s=5, clock=clock)
        await cache.get()
        clock.now += 10  # expired: the burst below finds a stale value
        loads.gate = asyncio.Event()
        waiting = [asyncio.ensure_future(cache.get()) for _ in range(20)]
        await asyncio.sleep(0.01)
        assert loads.calls == 2  # one refresh for all twenty
        loads.gate.set()
        assert await asyncio.gather(*waiting) == [2] * 20
        assert await cache.get() == 2 and loads.calls == 2

    asyncio.run(scenario())


def test_invalidate_drops_the_value_and_a_load_begun_before_it() -> None:
    async def scenario() -> None:
        loads = Loads()
        cache = SharedRefresh(loads, ttl_s=60, clock=Clock())
        assert await cache.get() == 1
        cache.invalidate()
        assert cache.peek() is None and await cache.get() == 2

        cache.invalidate()
        loads.gates = {3: asyncio.Event(), 4: asyncio.Event()}
        before = asyncio.ensure_future(cache.get())  # load 3 starts, then the change is learnt
        await asyncio.sleep(0.01)
        cache.invalidate()
        after = asyncio.ensure_future(cache.get())  # must not join load 3
        await asyncio.sleep(0.01)
        loads.gates[4].set()
        assert await after == 4
        loads.gates[3].set()  # the older load ends last: its answer must not replace the newer one
        assert await before == 3
        assert await cache.get() == 4 and loads.calls == 4

    asyncio.run(scenario())


def test_a_failed_load_reaches_every_waiter_and_is_not_kept() -> None:
    async def scenario() -> None:
        loads = Loads()
        cache = SharedRefresh(loads, ttl_s=60, clock=Clock())
        loads.gate, loads.fail_next = asyncio.Event(), True
        waiting = [asyncio.ensure_future(cache.get()) for _ in range(3)]
        await asyncio.sleep(0.01)
        loads.gate.set()
        answers = await asyncio.gather(*waiting, return_exceptions=True)
        assert loads.calls == 1 and all(isinstance(a, RuntimeError) for a in answers)
        assert cache.peek() is None and await cache.get() == 2  # tried again

    asyncio.run(scenario())


def test_a_cancelled_caller_does_not_cancel_the_shared_load() -> None:
    async def scenario() -> None:
        loads = Loads()
        cache = SharedRefresh(loads, ttl_s=60, clock=Clock())
        loads.gate = asyncio.Event()
        gone, staying = asyncio.ensure_future(cache.get()), asyncio.ensure_future(cache.get())
        await asyncio.sleep(0.01)
        gone.cancel()  # a client that disconnected
        await asyncio.sleep(0.01)
        loads.gate.set()
        assert await staying == 1 and loads.calls == 1
        with pytest.raises(asyncio.CancelledError):
            await gone

    asyncio.run(scenario())


def models_answer(index_version: str, composed_version: str | None) -> ModelsResponse:
    fusion: dict[str, Any] | None = None
    if composed_version is not None:
        fusion = {"version": "fusion-1", "index": {"version": composed_version}}
    return ModelsResponse(
        model={"version": "m"}, index={"version": index_version}, fusion=fusion, catalog={"version": "c"}
    )


def test_shows_index_version_compares_the_deployment_that_answered() -> None:
    both = models_answer("idx-1", "composed-1")
    assert shows_index_version(both, "search", "idx-1")
    assert not shows_index_version(both, "search", "idx-2")
    assert not shows_index_version(both, "search", "composed-1")  # the other deployment's index
    assert shows_index_version(both, "composed_search", "composed-1")
    assert not shows_index_version(both, "composed_search", "composed-2")
    assert not shows_index_version(models_answer("idx-1", None), "composed_search", "composed-1")


class RecordedMetrics:
    """What the router's middleware records, kept in a list (the real ServeMetrics needs a Serve replica)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int]] = []

    def record(self, route: str, status: int, seconds: float) -> None:
        assert seconds >= 0
        self.records.append((route, status))


def test_guard_and_measure_records_every_answer_and_refuses_without_a_key() -> None:
    """The plain-ASGI middleware: a 401 before the route runs when keys are required, the status the
    client got for every request (a route that raises counts as the 500 it becomes), paths under a root
    path recorded without it."""
    import httpx
    from fastapi import FastAPI

    from visuray.serving.router import GuardAndMeasure
    from visuray.serving.security import OPEN_PATHS, ApiKeyGuard

    app = FastAPI()
    ran: list[str] = []

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/ok")
    async def ok() -> dict[str, str]:
        ran.append("ok")
        return {"ok": "yes"}

    @app.get("/v1/broken")
    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_middleware(GuardAndMeasure)
    app.state.api_key_guard = ApiKeyGuard(("secret-key",), OPEN_PATHS)
    app.state.metrics = metrics = RecordedMetrics()

    async def scenario() -> list[int]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, root_path="/api")
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            key = {"X-API-Key": "secret-key"}
            answers = [
                await client.get("/api/healthz"),
                await client.get("/api/v1/ok"),
                await client.get("/api/v1/ok", headers={"X-API-Key": "wrong"}),
                await client.get("/api/v1/ok", headers=key),
                await client.get("/api/v1/broken", headers=key),
            ]
            return [a.status_code for a in answers]

    assert asyncio.run(scenario()) == [200, 401, 401, 200, 500]
    assert ran == ["ok"]  # the refused requests never reached the route
    assert metrics.records == [
        ("/healthz", 200),
        ("/v1/ok", 401),
        ("/v1/ok", 401),
        ("/v1/ok", 200),
        ("/v1/broken", 500),
    ]
