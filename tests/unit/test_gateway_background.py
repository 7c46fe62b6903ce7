"""The ingress replica's background loops (spool replay, alert delivery, ledger trimming)."""

from __future__ import annotations

import asyncio

from tokenmart.deployments.gateway import Gateway


def test_each_background_loop_runs_once_and_one_that_failed_starts_again_alone() -> None:
    started: list[str] = []

    async def forever() -> None:
        started.append("forever")
        await asyncio.sleep(3600)

    async def fails() -> None:
        started.append("fails")
        raise RuntimeError("a pass that failed")

    async def scenario() -> None:
        gateway = Gateway.__new__(Gateway)  # only the loops' bookkeeping is exercised
        gateway._replayer = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
        gateway.background, gateway._background = [forever, fails], []
        for _ in range(3):  # three requests
            gateway._ensure_replayer()
            await asyncio.sleep(0.01)
        tasks = [gateway._replayer, *gateway._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
    assert started == ["forever", "fails", "fails", "fails"]
