"""Screenshots of the fleet's web page for the README (docs/web-*.png).

Starts `buildfleet up` with a few bots in a temporary directory, keeps it busy
with actions of a few seconds each (more than the bots can run at once, so that
work queues), drains one bot through the page, and photographs each page in
headless Chromium (Debian's chromium and chromium-driver):

    .venv/bin/python scripts/web_screenshots.py [--out docs] [--warm-up 90]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import (
    remote_execution_pb2_grpc as re_grpc,
)
from buildfleet.digest import Digest

BOTS = 4
CLIENTS = 7  # more than the bots: work queues


def _digest(data: bytes) -> re_pb2.Digest:
    digest = Digest.of(data)
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size_bytes)


async def _load(endpoint: str, stop: threading.Event) -> None:
    """Clients that each run one action after another until `stop`."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        execution = re_grpc.ExecutionStub(channel)
        counter = 0

        async def client(index: int) -> None:
            nonlocal counter
            while not stop.is_set():
                counter += 1
                seconds = random.choice((0.5, 1, 1.5, 2, 3, 4))
                command = re_pb2.Command(
                    arguments=["sh", "-c", f"echo compiling unit {counter}; sleep {seconds}"],
                    output_paths=[f"out/unit{counter}.o"])
                command.platform.properties.add(name="OSFamily", value="linux")
                root = re_pb2.Directory().SerializeToString()
                action = re_pb2.Action(command_digest=_digest(command.SerializeToString()),
                                       input_root_digest=_digest(root))
                action.platform.CopyFrom(command.platform)
                action.timeout.FromSeconds(60)
                blobs = [command.SerializeToString(), root, action.SerializeToString()]
                await cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=_digest(b), data=b)
                    for b in blobs]))
                async for _ in execution.Execute(re_pb2.ExecuteRequest(
                        action_digest=_digest(blobs[-1]), skip_cache_lookup=True)):
                    pass

        await asyncio.gather(*(client(i) for i in range(CLIENTS)))


def _post(url: str, body: dict[str, str]) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "X-Buildfleet-Request": "page"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        response.read()


def _shoot(base: str, out: Path) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1280,860", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        for name, path in (("overview", "/"), ("bots", "/bots"), ("queues", "/queues"),
                           ("operations", "/operations")):
            driver.get(base + path)
            time.sleep(0.5)  # let the page's own refresh settle before the picture
            driver.save_screenshot(str(out / f"web-{name}.png"))
        driver.get(base + "/operations?stage=COMPLETED")
        link = driver.find_element(By.CSS_SELECTOR, "table.operations tbody a")
        driver.get(str(link.get_attribute("href")))
        driver.save_screenshot(str(out / "web-operation.png"))
        driver.get(base + "/bots")
        bot = driver.find_element(By.CSS_SELECTOR, "table.bots tbody a")
        driver.get(str(bot.get_attribute("href")))
        driver.save_screenshot(str(out / "web-bot.png"))
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--warm-up", type=float, default=90.0,
                        help="seconds of work before the pictures (the chart fills up)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as directory:
        up = subprocess.Popen(
            [sys.executable, "-m", "buildfleet", "up", "--bots", str(BOTS), "--sandbox", "none",
             "--listen", "127.0.0.1:0", "--data-dir", directory],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert up.stdout is not None
            endpoint = page = None
            for line in up.stdout:
                if found := re.match(r"buildfleet is up: grpc://(\S+)", line):
                    endpoint = found.group(1)
                if found := re.match(r"the fleet's page: (\S+)", line):
                    page = found.group(1).rstrip("/")
                if endpoint and page:
                    break
            if not endpoint or not page:
                print("buildfleet up did not start", file=sys.stderr)
                return 1
            stop = threading.Event()
            load = threading.Thread(target=lambda: asyncio.run(_load(endpoint, stop)),
                                    daemon=True)
            load.start()
            time.sleep(args.warm_up)
            _post(page + "/api/drain", {"instance": "", "pattern": "pool=spot"})
            bots_page = urllib.request.urlopen(page + "/bots", timeout=10).read().decode()  # noqa: S310
            first = re.search(r'data-bot="([^"]+)"', bots_page)
            if first:
                _post(page + "/api/drain", {"instance": "", "pattern": first.group(1)})
            time.sleep(3)
            _shoot(page, args.out)
            stop.set()
        finally:
            up.terminate()
            up.wait(60)
    for picture in sorted(args.out.glob("web-*.png")):
        print(picture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
