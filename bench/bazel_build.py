#!/usr/bin/env python3
"""A clean Bazel build of a generated C workspace, local and with remote execution.

The workspace: L libraries of three C files and a header each, a genrule per
library that generates a fourth C file, library i depending on libraries i-1 and
i/2, and one binary linking them all.  `bazel build //...` of it is 7 actions a
library (4 compiles, the genrule, a static and a shared archive) and 2 for the
binary: 422 with the default 60 libraries.

Rounds interleave a local clean build (Bazel's own sandbox on this machine) with
a clean build executed remotely by `buildfleet bot`s.  Every build first changes a
salt in every generated file, so that no action can be a cache hit, whether in
Bazel's output tree, the server's action cache or a bot's input cache.  Prints
each build's wall time, the medians, their ratio, and the CPU time the server and
the bots (their own processes, not the commands they run) spent per remote action.

    python bench/bazel_build.py                        # spawn a server and 4 bots
    python bench/bazel_build.py --rounds 3 --jobs 16 --bots 4
    python bench/bazel_build.py --target 127.0.0.1:50051 --server-pid 1234
                                # another server (the bots are still spawned here)

On Debian's Bazel (package bazel-bootstrap, no network) the rules it would
download are replaced: `rules_cc` and `rules_java` by stubs written into the
workspace, `platforms` by Debian's bazel-platforms (see --offline-rules).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_server_arguments, cpu_split, report, spawned_server  # noqa: E402

DEBIAN_PLATFORMS = Path("/usr/share/bazel/tools/platforms")
PROCESSES = re.compile(r"INFO: (\d+) processes?: (.*)")

# Bazel's own tools load these; re-exporting the native rules is all they need.
STUB_RULES = {
    "rules_cc/cc/defs.bzl": "".join(
        f"{name} = native.{name}\n" for name in (
            "cc_binary", "cc_library", "cc_test", "cc_import", "cc_toolchain",
            "cc_toolchain_suite")),
    "rules_java/java/defs.bzl": "".join(
        f"{name} = native.{name}\n" for name in (
            "java_binary", "java_import", "java_library", "java_runtime",
            "java_toolchain", "java_test", "java_plugin")),
}


def library_sources(index: int, salt: int) -> dict[str, str]:
    """The files of library `index`: three C files, a header and its BUILD rules."""
    name = f"lib{index:03d}"
    deps = sorted({index - 1, index // 2} - {index}) if index else []
    head = f"/* salt {salt} */\n"
    header = head + f"#pragma once\nint {name}_entry(int x);\n" + "".join(
        f"int {name}_part{part}(int x);\n" for part in range(3)) + f"int {name}_generated(int x);\n"
    files = {f"{name}/{name}.h": header}
    for part in range(3):
        body = [head, f'#include "{name}/{name}.h"\n']
        body += [f'#include "lib{dep:03d}/lib{dep:03d}.h"\n' for dep in deps]
        # Enough code that a compile costs what a small real one does.
        for fn in range(12):
            body.append(
                f"static int {name}_p{part}_f{fn}(int x) {{\n"
                f"  int acc = x;\n"
                f"  for (int i = 0; i < {fn + 3}; i++) acc = acc * {fn + 7} + (acc >> 3) - i;\n"
                f"  return acc ^ {salt % 1000 + fn};\n}}\n")
        calls = " + ".join(f"{name}_p{part}_f{fn}(x)" for fn in range(12))
        dep_calls = "".join(f" + lib{dep:03d}_entry(x - 1)" for dep in deps) if part == 0 else ""
        body.append(f"int {name}_part{part}(int x) "
                    f"{{ return x <= 0 ? 0 : ({calls}){dep_calls}; }}\n")
        if part == 0:
            body.append(f"int {name}_entry(int x) {{ return {name}_part1(x) + {name}_part2(x)"
                        f" + {name}_generated(x); }}\n")
        files[f"{name}/{name}_{part}.c"] = "".join(body)
    dep_labels = "".join(f'"//lib{dep:03d}", ' for dep in deps)
    files[f"{name}/BUILD"] = (
        f"# salt {salt}\n"
        f"genrule(\n    name = \"gen\",\n    outs = [\"{name}_gen.c\"],\n"
        f"    cmd = \"printf '#include \\\"{name}/{name}.h\\\"\\\\n"
        f"int {name}_generated(int x) {{ return x * {index + 1} + {salt % 97}; }}"
        f"\\\\n' > $@\",\n)\n"
        f"cc_library(\n    name = \"{name}\",\n"
        f"    srcs = [\"{name}_0.c\", \"{name}_1.c\", \"{name}_2.c\", \":gen\"],\n"
        f"    hdrs = [\"{name}.h\"],\n    deps = [{dep_labels}],\n"
        f"    visibility = [\"//visibility:public\"],\n)\n")
    return files


def workspace_files(libraries: int, salt: int) -> dict[str, str]:
    files: dict[str, str] = {"WORKSPACE": "", "BUILD": ""}
    for index in range(libraries):
        files.update(library_sources(index, salt))
    includes = "".join(f'#include "lib{i:03d}/lib{i:03d}.h"\n' for i in range(libraries))
    total = " + ".join(f"lib{i:03d}_entry(argc)" for i in range(libraries))
    files["app/main.c"] = (f"/* salt {salt} */\n#include <stdio.h>\n{includes}"
                           f"int main(int argc, char **argv) {{\n  (void)argv;\n"
                           f"  printf(\"%d\\n\", {total});\n  return 0;\n}}\n")
    files["app/BUILD"] = (f"# salt {salt}\ncc_binary(\n    name = \"app\",\n"
                          f"    srcs = [\"main.c\"],\n    deps = [" +
                          "".join(f'"//lib{i:03d}", ' for i in range(libraries)) + "],\n)\n")
    return files


def write_workspace(root: Path, libraries: int, salt: int) -> None:
    for relative, text in workspace_files(libraries, salt).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def offline_flags(stubs: Path) -> list[str]:
    """--override_repository flags for Debian's Bazel, with the stub rules written."""
    for relative, text in STUB_RULES.items():
        path = stubs / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        (path.parent / "BUILD").write_text('exports_files(["defs.bzl"])\n')
        for top in ("WORKSPACE", "BUILD"):
            (path.parent.parent / top).touch()
    flags = [f"--override_repository=rules_cc={stubs / 'rules_cc'}",
             f"--override_repository=rules_java={stubs / 'rules_java'}"]
    if DEBIAN_PLATFORMS.is_dir():
        flags.append(f"--override_repository=platforms={DEBIAN_PLATFORMS}")
    return flags


class Bazel:
    def __init__(self, binary: str, workspace: Path, output_root: Path,
                 common_flags: list[str]) -> None:
        self.binary = binary
        self.workspace = workspace
        self.startup = [f"--output_user_root={output_root}"]
        self.common = common_flags

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.binary, *self.startup, *args], cwd=self.workspace,
                                capture_output=True, text=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"bazel {' '.join(args)} failed:\n{result.stderr[-4000:]}")
        return result

    def clean_build(self, flags: list[str]) -> tuple[float, dict[str, int]]:
        """Seconds for `bazel build //...` after `bazel clean`, and its process counts."""
        self.run("clean")
        start = time.monotonic()
        result = self.run("build", *self.common, *flags, "//...")
        elapsed = time.monotonic() - start
        counts: dict[str, int] = {}
        for match in PROCESSES.finditer(result.stderr):
            for part in match.group(2).split(","):
                number, _, kind = part.strip().rstrip(".").partition(" ")
                counts[kind] = int(number)
        return elapsed, counts


def wait_for_bots(logs: list[Path], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for log in logs:
        while "registered as session" not in (log.read_text() if log.exists() else ""):
            if time.monotonic() > deadline:
                raise RuntimeError(f"a bot did not register:\n{log.read_text()}")
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bazel", default="bazel", help="the Bazel binary")
    parser.add_argument("--libraries", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--bots", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    add_server_arguments(parser)
    parser.add_argument("--sandbox", default="bwrap", choices=["bwrap", "none"],
                        help="the bots' sandbox")
    parser.add_argument("--offline-rules", choices=["auto", "on", "off"], default="auto",
                        help="stub rules_cc/rules_java for a Bazel without network "
                             "(auto: when Bazel is Debian's bazel-bootstrap)")
    parser.add_argument("--remote-only", action="store_true", help="skip the local builds")
    parser.add_argument("--logs", type=Path, help="copy the bots' logs into this directory")
    args = parser.parse_args()
    if shutil.which(args.bazel) is None:
        parser.error(f"no Bazel found as {args.bazel!r} (Debian: apt-get install "
                     "bazel-bootstrap bazel-platforms)")

    with tempfile.TemporaryDirectory(prefix="buildfleet-bazel-bench-") as tmp:
        root = Path(tmp)
        workspace = root / "workspace"
        workspace.mkdir()
        version = subprocess.run([args.bazel, "--version"], capture_output=True,
                                 text=True).stdout.strip()
        offline = args.offline_rules == "on" or (
            args.offline_rules == "auto" and Path("/usr/share/bazel/embedded_tools").is_dir())
        flags = [f"--jobs={args.jobs}", "--color=no", "--curses=no"]
        if offline:
            flags += offline_flags(root / "stubs")
        bazel = Bazel(args.bazel, workspace, root / "bazel-root", flags)

        def remote_flags(address: str) -> list[str]:
            return [f"--remote_executor=grpc://{address}",
                    f"--remote_instance_name={args.instance}"]

        def rounds(address: str, server_pid: int | None) -> dict[str, object]:
            logs = [root / f"bot{n}.log" for n in range(args.bots)]
            bots = []
            for n, log in enumerate(logs):
                with open(log, "wb") as out:
                    bots.append(subprocess.Popen(
                        [sys.executable, "-m", "buildfleet", "bot",
                         "--server", f"grpc://{address}", "--instance", args.instance,
                         "--work-dir", str(root / f"bot{n}"), "--sandbox", args.sandbox,
                         "--bot-id", f"bench-bot-{n}", "--log-level", "info"],
                        stdout=out, stderr=subprocess.STDOUT))
            try:
                wait_for_bots(logs)
                local: list[float] = []
                remote: list[float] = []
                # per round, ms per remote action: (user, system)
                spent: dict[str, list[tuple[float, float]]] = {"server": [], "bots": []}
                actions = 0
                salt = int(time.time())

                def cpu() -> dict[str, tuple[float, float]]:
                    splits = [cpu_split(b.pid) for b in bots]
                    now = {"bots": (sum(u for u, _ in splits), sum(s for _, s in splits))}
                    if server_pid:
                        now["server"] = cpu_split(server_pid)
                    return now

                for number in range(args.rounds):
                    if not args.remote_only:
                        salt += 1
                        write_workspace(workspace, args.libraries, salt)
                        seconds, counts = bazel.clean_build([])
                        local.append(seconds)
                        print(f"round {number + 1}: local  {seconds:6.2f} s {counts}",
                              flush=True)
                    salt += 1
                    write_workspace(workspace, args.libraries, salt)
                    before = cpu()
                    seconds, counts = bazel.clean_build(remote_flags(address))
                    after = cpu()
                    actions = counts.get("remote", 0)
                    if actions == 0:
                        raise RuntimeError(f"no action ran remotely: {counts}")
                    remote.append(seconds)
                    for who, (user, system) in after.items():
                        spent[who].append(((user - before[who][0]) * 1000 / actions,
                                           (system - before[who][1]) * 1000 / actions))
                    print(f"round {number + 1}: remote {seconds:6.2f} s {counts}", flush=True)
            finally:
                for bot in bots:
                    bot.send_signal(signal.SIGTERM)
                for bot in bots:
                    try:
                        bot.wait(30)
                    except subprocess.TimeoutExpired:
                        bot.kill()
                bazel.run("shutdown", check=False)
                if args.logs:
                    args.logs.mkdir(parents=True, exist_ok=True)
                    for log in logs:
                        shutil.copy(log, args.logs / log.name)
            figures: dict[str, object] = {
                "bazel": version, "libraries": args.libraries, "jobs": args.jobs,
                "bots": args.bots, "remote_actions": actions,
                "remote_s": [round(s, 2) for s in remote],
                "remote_median_s": round(statistics.median(remote), 2),
            }
            for who, rounds_spent in spent.items():
                if rounds_spent:
                    user = statistics.median(u for u, _ in rounds_spent)
                    system = statistics.median(s for _, s in rounds_spent)
                    prefix = "bot" if who == "bots" else who
                    figures[f"{prefix}_cpu_ms_per_action"] = round(statistics.median(
                        u + s for u, s in rounds_spent), 2)
                    figures[f"{prefix}_user_system_ms"] = f"{user:.1f} + {system:.1f}"
            if local:
                figures["local_s"] = [round(s, 2) for s in local]
                figures["local_median_s"] = round(statistics.median(local), 2)
                figures["remote_over_local"] = round(
                    statistics.median(remote) / statistics.median(local), 2)
            return figures

        if args.target:
            figures = rounds(args.target, args.server_pid)
        else:
            with spawned_server() as (address, process):
                figures = rounds(address, process.pid)
    report("bazel_build", figures)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
