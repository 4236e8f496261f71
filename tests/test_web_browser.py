"""The fleet's web page in a real headless Chromium (Selenium): an operator watches a
grid with bots and queued work, sees the figures change without reloading when an
action completes, drains a bot with its button, and opens an operation."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from botkit import Client, StubBot, action_result, leased_action, poll_leases
from botprocess import Remote, wait_for
from webkit import Browser, page_url, require_browser, web_config

from buildfleet._proto.buildfleet.admin.v1 import admin_pb2, admin_pb2_grpc

PNG = b"\x89PNG\r\n\x1a\n"


async def test_an_operator_watches_and_steers_the_fleet(start_server: Any,
                                                        tmp_path: Path) -> None:
    require_browser()
    # The stub bots call only when told: a keepalive long enough for the whole test.
    server = await start_server(web_config({"instances": {"": {"scheduler": {
        "keepalive": 120, "housekeeping-interval": 0.2}}}}))
    bots = [StubBot(server.channel, bot_id=f"linux-{n}",
                    properties=[("OSFamily", "linux"), ("pool", "spot")]) for n in "ab"]
    for bot in bots:
        await bot.register(status=1)
    client = Client(server.channel)
    calls = []
    for n in range(3):  # the stub bots take nothing until told: all three queue
        call = client.execute(await client.action("sleep", str(n),
                                                  platform=[("OSFamily", "linux")]))
        calls.append(call)
        await client.first_operation(call)

    browser = await Browser.start(tmp_path)
    try:
        await browser.open(page_url(server))
        assert await browser.text(".figure.bots") == "2"
        assert await browser.text(".figure.queued") == "3"
        assert await browser.text('b[data-status="OK"]') == "2"
        await browser.script("window.stillTheSamePage = true;")

        # a bot takes an action and finishes it: the overview follows by itself
        (lease,) = await poll_leases(bots[0])
        bots[0].complete(lease.id, action_result(stdout=b"done\n"))
        await bots[0].update()

        async def overview_shows_it() -> bool:
            return (await browser.text(".figure.queued") == "2"
                    and await browser.text(".last-minute") == "1")

        await wait_for(overview_shows_it, "the completed action on the overview, live")
        assert await browser.script("return window.stillTheSamePage === true;")
        await browser.screenshot(tmp_path / "overview.png")

        # drain a bot with its button
        await browser.open(page_url(server, "/bots"))
        await browser.click('button[data-action="drain"][data-pattern="linux-b"]')

        async def drained() -> bool:
            texts = await browser.texts('tr[data-bot="linux-b"] .badge.draining')
            return texts == ["draining"]

        await wait_for(drained, "linux-b shown as draining")
        assert "drained linux-b" in await browser.text("#flash")
        listed = await admin_pb2_grpc.AdminStub(server.channel).ListBots(
            admin_pb2.ListBotsRequest())
        assert {b.bot_id: b.draining for b in listed.bots} == {"linux-a": False,
                                                               "linux-b": True}
        assert await browser.texts('tr[data-bot="linux-a"] .badge.draining') == []
        await browser.screenshot(tmp_path / "bots.png")

        # an operation's detail, from the list
        await browser.open(page_url(server, "/operations?stage=COMPLETED"))
        (link,) = await browser.texts("table.operations tbody a[href^='/operation?']")
        await browser.click("table.operations tbody a[href^='/operation?']")
        await wait_for(lambda: _title_is(browser, "Operation"), "the operation's page")
        assert await browser.text(".operation-name") == link
        assert await browser.text(".action-digest") == lease_digest(lease)
        assert await browser.text(".exit-code") == "0"
        assert (await browser.text("code.command")).startswith("sleep ")
        await browser.screenshot(tmp_path / "operation.png")
        for shot in ("overview", "bots", "operation"):
            assert (tmp_path / f"{shot}.png").read_bytes().startswith(PNG)
    finally:
        await browser.close()
        for call in calls:
            call.cancel()


def lease_digest(lease: Any) -> str:
    digest = leased_action(lease)
    return f"{digest.hash}/{digest.size_bytes}"


async def _title_is(browser: Browser, title: str) -> bool:
    return bool(await browser.script(f"return document.title.startsWith({title!r});"))


async def test_an_operator_reads_a_running_actions_output(start_server: Any, spawn_bot: Any,
                                                          tmp_path: Path) -> None:
    require_browser()
    server = await start_server(web_config())
    bot = spawn_bot(server.address)
    await bot.registered()
    remote = Remote(server.channel)
    go = tmp_path / "go"
    digest = await remote.action(
        "sh", "-c", f"echo compiling main.c; echo 'warning: <unused>' >&2; "
        f"while [ ! -e {go} ]; do sleep 0.05; done; echo linked")
    call = remote.execute(digest)
    name = await wait_for(lambda: _executing(server), "the operation to run")
    browser = await Browser.start(tmp_path)
    try:
        await browser.open(page_url(server, "/operation?" + urlencode({"name": name})))

        async def shows(selector: str, text: str) -> bool:
            return await browser.text(selector) == text

        await wait_for(lambda: shows("pre.output.stdout", "compiling main.c"),
                       "stdout on the page while the action runs")
        await wait_for(lambda: shows("pre.output.stderr", "warning: <unused>"),
                       "stderr as text, not markup")
        await browser.screenshot(tmp_path / "output.png")
        go.touch()
        await wait_for(lambda: shows("pre.output.stdout", "compiling main.c\nlinked"),
                       "the rest of the output")
        await wait_for(lambda: shows(".output-state", "The action has ended: its whole "
                                     "output is in its result."), "the end of the output")
        await remote.client.result(call)
    finally:
        await browser.close()


async def _executing(server: Any) -> str | None:
    answer = await admin_pb2_grpc.AdminStub(server.channel).ListOperations(
        admin_pb2.ListOperationsRequest(stage="EXECUTING"))
    return answer.operations[0].name if answer.operations else None
