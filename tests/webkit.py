"""The fleet's web page in tests: a server with the page on, plain HTTP requests to
it (aiohttp's client, on the test's loop), and a real headless Chromium driven by
Selenium (Debian's chromium and chromium-driver; each Selenium call runs on a
thread, since the server runs on the test's event loop)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from botprocess import SERVER_CONFIG

REQUIRED = os.environ.get("BUILDFLEET_REQUIRE_BROWSER") == "1"  # set by .ci/run
CHROMIUM = os.environ.get("BUILDFLEET_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("BUILDFLEET_CHROMEDRIVER", "/usr/bin/chromedriver")
PAGE_HEADER = {"X-Buildfleet-Request": "page"}


def web_config(config: dict[str, Any] | None = None, **web: Any) -> dict[str, Any]:
    """SERVER_CONFIG (or `config`) with the web page on a free loopback port."""
    return {**(config or SERVER_CONFIG), "web": {"listen": "127.0.0.1:0", **web}}


def page_url(server: Any, path: str = "/") -> str:
    url = server.server.web_url()
    assert url is not None, "the web page is off"
    return url.rstrip("/") + path


@dataclass
class Visitor:
    """An HTTP client of the page with a cookie jar of its own (aiohttp)."""

    base: str
    session: aiohttp.ClientSession = field(init=False)

    def __post_init__(self) -> None:
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def get(self, path: str, **kwargs: Any) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.session.get(self.base + path, allow_redirects=False,
                                    **kwargs) as response:
            return response.status, await response.text(), response

    async def post(self, path: str, *, json: Any = None, data: Any = None,
                   headers: dict[str, str] | None = None
                   ) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.session.post(self.base + path, json=json, data=data,
                                     headers=headers, allow_redirects=False) as response:
            return response.status, await response.text(), response

    async def change(self, action: str, **body: str) -> tuple[int, Any]:
        """What the page's buttons send."""
        async with self.session.post(f"{self.base}/api/{action}", json=body,
                                     headers=PAGE_HEADER) as response:
            return response.status, await response.json()

    async def login(self, token: str) -> int:
        status, _, _ = await self.post("/login", data={"token": token, "next": "/"})
        return status

    async def close(self) -> None:
        await self.session.close()


def require_browser() -> None:
    """Skip (or, in CI, fail) a test that needs Chromium when it is not installed."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER)
               if not (os.access(path, os.X_OK) or shutil.which(path))]
    if not missing:
        return
    message = (f"{', '.join(missing)} not installed (Debian packages chromium and "
               "chromium-driver; .ci/run installs them)")
    if REQUIRED:
        pytest.fail(message)
    pytest.skip(message)


class Browser:
    """Headless Chromium; every method runs Selenium on a thread."""

    def __init__(self, download_dir: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1280,900",
                         f"--user-data-dir={download_dir / 'chromium-profile'}"):
            options.add_argument(argument)
        self.driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER),
                                       options=options)
        self.driver.set_page_load_timeout(30)

    @classmethod
    async def start(cls, directory: Path) -> Browser:
        return await asyncio.to_thread(cls, directory)

    async def run(self, action: Callable[[Any], Any]) -> Any:
        """`action(driver)` on a thread."""
        return await asyncio.to_thread(action, self.driver)

    async def open(self, url: str) -> None:
        await self.run(lambda driver: driver.get(url))

    async def texts(self, selector: str) -> list[str]:
        """The text of every element `selector` matches, read in one step (the live
        refresh may replace the elements at any moment)."""
        found = await self.script(
            "return Array.from(document.querySelectorAll(arguments[0]))"
            ".map(e => e.innerText.trim());", selector)
        return [str(text) for text in found]

    async def text(self, selector: str) -> str:
        found = await self.texts(selector)
        assert found, f"nothing on the page matches {selector!r}"
        return found[0]

    async def click(self, selector: str) -> None:
        """A real click; found again when a refresh replaced the element in between."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By

        def click(driver: Any) -> None:
            for _ in range(10):
                try:
                    driver.find_element(By.CSS_SELECTOR, selector).click()
                    return
                except StaleElementReferenceException:
                    continue
            raise AssertionError(f"{selector!r} kept being replaced before a click")

        await self.run(click)

    async def script(self, source: str, *arguments: Any) -> Any:
        return await self.run(lambda driver: driver.execute_script(source, *arguments))

    async def screenshot(self, path: Path) -> None:
        await self.run(lambda driver: driver.save_screenshot(str(path)))

    async def close(self) -> None:
        await asyncio.to_thread(self.driver.quit)
