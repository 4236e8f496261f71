"""The fleet's web page over plain HTTP: what each page shows of a running grid, its
changes, and the attacks it must refuse (requests from other sites, DNS rebinding,
visitors without the role, markup smuggled in through bot properties).  The page
in a real browser: tests/test_web_browser.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import authkit
import pytest
from authkit import Keys
from botkit import Client, StubBot, action_result, poll_leases
from botprocess import wait_for
from webkit import PAGE_HEADER, Visitor, page_url, web_config

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc
from buildfleet.config import ConfigError, parse_config
from buildfleet.server.app import check_exposure
from buildfleet.server.web import pages

BOTH_SCHEDULERS = True  # the page's figures come from each strategy's views

FRAGMENT = {"X-Buildfleet-Fragment": "1"}


async def test_the_pages_show_the_grid(start_server: Any, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    server = await start_server(web_config())
    visitor = Visitor(page_url(server, ""))
    try:
        runner = StubBot(server.channel, bot_id="runner-1",
                         properties=[("OSFamily", "linux"), ("pool", "<b>spot</b>")])
        idle = StubBot(server.channel, bot_id="idle-1", properties=[("OSFamily", "linux")])
        await runner.register(status=1)
        await idle.register(status=1)
        assert runner.session is not None
        await bots_pb2_grpc.BotsStub(server.channel).PostBotEventTemp(
            bots_pb2.PostBotEventTempRequest(name=runner.session.name,
                                             msg="<script>alert(1)</script>"))
        client = Client(server.channel)
        digest = await client.action("echo", "it's <here>", platform=[("OSFamily", "linux")])
        call = client.execute(digest, priority=3, request_metadata=re_pb2.RequestMetadata(
            tool_details=re_pb2.ToolDetails(tool_name="bazel", tool_version="7.4.1"),
            tool_invocation_id="inv-<web>", action_mnemonic="Genrule", target_id="//:it"))
        operation = await client.first_operation(call)

        async def overview_with(text: str) -> str | None:
            status, html, _ = await visitor.get("/")
            assert status == 200, html
            return html if text in html else None

        html = await wait_for(lambda: overview_with('<span class="figure bots">2</span>'),
                              "both bots on the overview")
        assert html.startswith("<!doctype html>") and 'src="/static/app.js"' in html
        await wait_for(lambda: overview_with('<span class="figure queued">1</span>'),
                       "the queued action on the overview")

        # the live part alone, for the page's refresh
        status, fragment, _ = await visitor.get("/", headers=FRAGMENT)
        assert status == 200 and "<html" not in fragment and 'class="figure bots"' in fragment

        # bots: their properties escaped, never markup
        status, html, _ = await visitor.get("/bots")
        assert status == 200
        assert "pool=&lt;b&gt;spot&lt;/b&gt;" in html and "<b>spot</b>" not in html
        assert 'data-action="drain" data-instance="" data-pattern="runner-1"' in html
        status, html, _ = await visitor.get("/bots?q=idle-*")
        assert 'data-bot="idle-1"' in html and 'data-bot="runner-1"' not in html
        # a large fleet: the page lists a bounded number and says how many there are
        monkeypatch.setattr(pages, "BOTS_SHOWN", 1)
        status, html, _ = await visitor.get("/bots")
        assert html.count("<tr data-bot=") == 1 and "1 of 2 bots shown" in html
        monkeypatch.undo()
        status, html, _ = await visitor.get("/bot?id=runner-1")
        assert status == 200 and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<script>alert" not in html
        status, html, _ = await visitor.get("/bot?id=nobody")
        assert status == 404 and "no live bot &#39;nobody&#39;" in html

        # the queue, then the action run and finished
        status, html, _ = await visitor.get("/queues")
        assert 'class="n queued">1</td>' in html
        (lease,) = await poll_leases(runner)
        runner.complete(lease.id, action_result(stdout=b"it's <here>\n"))
        await runner.update()
        await client.result(call)
        status, html, _ = await visitor.get("/operations?stage=COMPLETED")
        assert f'data-operation="{operation.name}"' in html and "exit 0" in html
        status, html, _ = await visitor.get("/operations?stage=QUEUED")
        assert f'data-operation="{operation.name}"' not in html
        status, html, _ = await visitor.get("/operations?stage=sideways")
        assert status == 400 and "use QUEUED, EXECUTING or COMPLETED" in html

        status, html, _ = await visitor.get(f"/operation?name={operation.name}")
        assert status == 200
        assert f"{digest.hash}/{digest.size_bytes}" in html
        assert "echo &#39;it&#39;&#34;&#39;&#34;&#39;s &lt;here&gt;&#39;" in html  # shlex-quoted
        assert "runner-1" in html and 'class="exit-code">0<' in html
        assert '<dd class="priority">3</dd>' in html
        assert '<dd class="mnemonic">Genrule</dd>' in html and "bazel 7.4.1" in html
        assert "invocation:inv-&lt;web&gt;" in html  # its build, escaped, links to its ops
        status, listing, _ = await visitor.get("/operations?invocation=inv-%3Cweb%3E")
        assert f'data-operation="{operation.name}"' in listing
        status, listing, _ = await visitor.get("/operations?invocation=another")
        assert f'data-operation="{operation.name}"' not in listing
        start = html.index('href="/blob?')
        link = html[start + len('href="'):html.index('"', start + len('href="'))]
        status, text, response = await visitor.get(link.replace("&amp;", "&"))
        assert status == 200 and text == "it's <here>\n"
        assert response.content_type == "text/plain"  # never rendered as HTML
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        status, text, _ = await visitor.get(
            "/blob?digest=" + "0" * 64 + "/5")
        assert status == 404 and "not in the CAS" in text

        # the chart counts the job that finished (the replicated view: a tick later)
        await wait_for(lambda: overview_with('<strong class="last-minute">1</strong>'),
                       "the finished job in the throughput chart")
    finally:
        await visitor.close()


async def test_changes_come_only_from_the_page(start_server: Any) -> None:
    server = await start_server(web_config())
    visitor = Visitor(page_url(server, ""))
    try:
        drains = await visitor.get("/bots")
        assert "No drains." in drains[1]
        # a form or script of another site: no page header, or another origin
        status, body, _ = await visitor.post("/api/drain", json={"instance": "",
                                                                 "pattern": "*"})
        assert status == 403 and "did not come from this page" in body
        status, body, _ = await visitor.post(
            "/api/drain", json={"instance": "", "pattern": "*"},
            headers={**PAGE_HEADER, "Origin": "http://evil.example"})
        assert status == 403
        assert "No drains." in (await visitor.get("/bots"))[1]
        # DNS rebinding: another name that resolves to this machine
        for host in ("evil.example", "localhost.evil.example", "127.0.0.1.evil.example",
                     "[::2]:80"):
            status, body, _ = await visitor.get("/", headers={"Host": host})
            assert status == 421 and "loopback host names" in body, host
        for host in ("localhost:8080", "127.0.0.5", "[::1]:8080"):
            assert (await visitor.get("/", headers={"Host": host}))[0] == 200, host
        status, body, _ = await visitor.post(
            "/api/drain", json={"instance": "", "pattern": "*"},
            headers={**PAGE_HEADER, "Host": "evil.example"})
        assert status == 421
        # the page itself
        status, answer = await visitor.change("drain", instance="", pattern="pool=spot")
        assert status == 200 and answer["message"].startswith("drained pool=spot")
        assert "<code>pool=spot</code>" in (await visitor.get("/bots"))[1]
        status, answer = await visitor.change("drain", instance="", pattern="a b")
        assert status == 400 and "contains spaces" in answer["error"]
        status, answer = await visitor.change("undrain", instance="", pattern="pool=spot")
        assert status == 200
        status, answer = await visitor.change("undrain", instance="", pattern="pool=spot")
        assert status == 404 and "has no drain" in answer["error"]
        status, answer = await visitor.change("cancel", name="nothing/operations/x")
        assert status == 404
        status, body, _ = await visitor.post("/api/cancel", data="[1, 2]",
                                             headers=PAGE_HEADER)
        assert status == 400 and "not a JSON object" in body
        # the login page of a grid without authentication leads back to the overview
        status, _, response = await visitor.get("/login")
        assert status == 303 and response.headers["Location"] == "/"
    finally:
        await visitor.close()


async def test_with_authentication_every_page_needs_the_role(start_server: Any,
                                                             tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys")
    config = {**web_config(plaintext=True), "auth": keys.auth(), "tls": keys.tls()}
    server = await start_server(config)
    base = page_url(server, "")
    reader_token = keys.token("watcher", "read")
    admin_token = keys.token("operator", "admin")
    alice_token = keys.token("alice", "execute")
    bob_token = keys.token("bob", "execute")
    stranger, reader, admin = Visitor(base), Visitor(base), Visitor(base)
    alice, bob = Visitor(base), Visitor(base)
    try:
        # nobody's credentials: the login page, for every page and change
        status, _, response = await stranger.get("/bots?q=x")
        assert status == 303
        location = urlsplit(response.headers["Location"])
        assert location.path == "/login" and parse_qs(location.query) == {"next": ["/bots?q=x"]}
        status, body, _ = await stranger.get("/", headers=FRAGMENT)
        assert status == 401 and "no credentials" in body
        status, answer = await stranger.change("drain", instance="", pattern="*")
        assert status == 401
        status, body, _ = await stranger.get("/blob?digest=" + "0" * 64 + "/1")
        assert status == 303
        assert await stranger.login("not-a-token") == 401
        # an open redirect through the login form goes nowhere else
        status, _, response = await stranger.post(
            "/login", data={"token": reader_token, "next": "//evil.example/"})
        assert status == 303 and response.headers["Location"] == "/"

        assert await reader.login(reader_token) == 303
        (cookie,) = reader.session.cookie_jar
        assert cookie["httponly"] and cookie["samesite"] == "Strict"
        status, html, _ = await reader.get("/bots")
        assert status == 200 and "watcher" in html
        assert 'data-action="drain"' not in html  # no buttons it may not use
        status, answer = await reader.change("drain", instance="", pattern="*")
        assert status == 403 and "needs one of the roles admin" in answer["error"]
        assert await admin.login(admin_token) == 303
        status, answer = await admin.change("drain", instance="", pattern="pool=spot")
        assert status == 200
        assert "<code>pool=spot</code>" in (await reader.get("/bots"))[1]

        # an execute principal sees its own operations only
        client_of = {}
        for name, token, visitor in (("alice", alice_token, alice), ("bob", bob_token, bob)):
            assert await visitor.login(token) == 303
            channel = authkit.channel(server.address, keys, token=token)
            client_of[name] = channel
            client = Client(channel)
            call = client.execute(await client.action("true", salt=name.encode()))
            client_of[name + "-op"] = (await client.first_operation(call)).name
            client_of[name + "-call"] = call
        status, html, _ = await alice.get("/operations")
        assert client_of["alice-op"] in html and client_of["bob-op"] not in html
        status, html, _ = await alice.get(f"/operation?name={client_of['bob-op']}")
        assert status in (403, 404) and 'class="action-digest"' not in html
        # nor its output, live or not (a refusal, not an empty answer)
        status, body, response = await alice.get(
            f"/output?name={client_of['bob-op']}&stream=stdout&offset=0")
        assert status in (403, 404) and "X-Output-Next" not in response.headers, body
        status, _, response = await bob.get(
            f"/output?name={client_of['bob-op']}&stream=stdout&offset=0")
        assert status == 200 and response.headers["X-Output-Complete"] in ("0", "1")
        status, html, _ = await admin.get("/operations")
        assert client_of["alice-op"] in html and client_of["bob-op"] in html
        status, answer = await alice.change("cancel", name=client_of["bob-op"])
        assert status == 403
        for name in ("alice", "bob"):
            client_of[name + "-call"].cancel()
            await client_of[name].close()

        status, _, response = await admin.post("/logout")
        assert status == 303
        status, _, _ = await admin.get("/")
        assert status == 303  # logged out
    finally:
        for visitor in (stranger, reader, admin, alice, bob):
            await visitor.close()


def test_a_page_reachable_from_other_machines_needs_authentication(tmp_path: Path) -> None:
    exposed = parse_config({"web": {"listen": "0.0.0.0:0"}, "data-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"refusing to serve 0\.0\.0\.0:0 without "
                                          "authentication"):
        check_exposure(exposed)
    check_exposure(parse_config({"web": {"listen": "127.0.0.1:0"},
                                 "data-dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match="web: plaintext and tls exclude each other"):
        parse_config({"web": {"listen": "127.0.0.1:0", "plaintext": True,
                              "tls": {"cert": "a", "key": "b"}}})
