"""The fleet's web page of a grid of replicas: each replica's page shows the whole
grid (bots, finished jobs, drains), whichever replica the work went through."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from botkit import Client, StubBot, action_result, poll_leases
from botprocess import wait_for
from webkit import Visitor, page_url, web_config


async def test_every_replica_shows_the_whole_grid(pg_url: str, start_server: Any,
                                                  tmp_path: Path) -> None:
    config = {**web_config(), "database": pg_url}
    first = await start_server(config, data_dir=tmp_path / "a")
    second = await start_server(config, data_dir=tmp_path / "b")
    bot = StubBot(first.channel, bot_id="on-first")
    await bot.register(status=1)
    client = Client(first.channel)
    call = client.execute(await client.action("true"))
    await client.first_operation(call)
    (lease,) = await poll_leases(bot)
    bot.complete(lease.id, action_result())
    await bot.update()
    await client.result(call)
    visitor = Visitor(page_url(second, ""))
    try:
        async def shown() -> bool:
            html = (await visitor.get("/"))[1]
            return ('<span class="figure bots">1</span>' in html
                    and '<strong class="last-minute">1</strong>' in html)

        await wait_for(shown, "the first replica's bot and job on the second's page")
        status, answer = await visitor.change("drain", instance="", pattern="on-first")
        assert status == 200
        other = Visitor(page_url(first, ""))
        try:
            await wait_for(lambda: _drained(other), "the drain on the first replica")
        finally:
            await other.close()
    finally:
        await visitor.close()


async def _drained(visitor: Visitor) -> bool:
    return '<span class="badge draining">draining</span>' in (await visitor.get("/bots"))[1]
