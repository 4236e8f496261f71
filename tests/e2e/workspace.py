"""The Bazel workspace the end-to-end tests build, written into a temporary directory.

Layout under the root given to `write_workspace`:

- ``ws/``: the workspace.  ``//:greeting`` (echo) -> ``//:shout`` (cat | tr) ->
  ``//:report`` (run by the ``//:tool`` sh_binary); ``//:big`` (4.8 MB, more than
  a CAS batch) -> ``//:big_sha256``; ``//:hello``, a cc_binary of two C files compiled
  with the host's gcc; ``//:hello_test``, an sh_test that runs it and checks the
  genrule outputs; ``//fail:bad`` (tagged manual, so not in ``//...``), a genrule
  that prints to stderr and exits 3.
- ``rules_cc/`` and ``rules_java/``: local stand-ins for the rule repositories that
  Bazel's own tools load, whose .bzl files forward to the native rules, so that
  Debian's Bazel builds without downloading anything.

The workspace's ``.bazelrc`` holds what Debian's Bazel needs to build offline
(``--nosandbox_debug`` against the ``--sandbox_debug`` of /etc/bazel/bazelrc, a local
``--coverage_report_generator``) and try-imports ``buildfleet.bazelrc``, where a
test may put the remote-execution settings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

GREETING = b"hello, buildfleet\n"
SHOUT = GREETING.upper()
REPORT = f"{len(SHOUT)} bytes: {SHOUT.decode().rstrip()}\n".encode()
BIG_COUNT = 700_000  # `seq 1 700000`: about 4.8 MB, more than a CAS batch holds
BIG = b"".join(b"%d\n" % number for number in range(1, BIG_COUNT + 1))
HELLO_OUTPUT = b"hello from C: 6 * 7 = 42\n"
FAIL_MARKER = "e2e-marker: the bad genrule failed on purpose"

_CC_RULES = ["cc_binary", "cc_library", "cc_test", "cc_proto_library", "cc_toolchain",
             "cc_toolchain_suite", "objc_library"]
_JAVA_RULES = ["java_binary", "java_import", "java_library", "java_proto_library",
               "java_runtime", "java_toolchain"]


def _forwarders(rules: list[str]) -> str:
    header = '"""Stand-in for the rule repository: every rule forwards to the native one."""\n'
    return header + "".join(f"\ndef {rule}(**kwargs):\n    native.{rule}(**kwargs)\n"
                            for rule in rules)


def _write(path: Path, text: str | bytes, executable: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    path.chmod(0o755 if executable else 0o644)


BUILD = '''\
genrule(
    name = "greeting",
    outs = ["greeting.txt"],
    cmd = "echo 'hello, buildfleet' > $@",
)

genrule(
    name = "shout",
    srcs = [":greeting"],
    outs = ["shout.txt"],
    cmd = "cat $< | tr a-z A-Z > $@",
)

sh_binary(
    name = "tool",
    srcs = ["tool.sh"],
)

genrule(
    name = "report",
    srcs = [":shout"],
    outs = ["report.txt"],
    tools = [":tool"],
    cmd = "$(location :tool) $< $@",
)

genrule(
    name = "big",
    outs = ["big.bin"],
    cmd = "seq 1 BIG_COUNT > $@",
)

genrule(
    name = "big_sha256",
    srcs = [":big"],
    outs = ["big.sha256"],
    cmd = "sha256sum $< | cut -d' ' -f1 > $@",
)

cc_binary(
    name = "hello",
    srcs = ["main.c", "multiply.c", "multiply.h"],
)

sh_test(
    name = "hello_test",
    size = "small",
    srcs = ["hello_test.sh"],
    data = [":hello", ":report", ":big_sha256"],
)
'''.replace("BIG_COUNT", str(BIG_COUNT))

TOOL = '''\
#!/bin/sh
# Writes "<size of $1> bytes: <content of $1>" to $2.
set -eu
printf '%s bytes: %s\\n' "$(wc -c < "$1" | tr -d ' ')" "$(cat "$1")" > "$2"
'''

MAIN_C = '''\
#include <stdio.h>
#include "multiply.h"

int main(void) {
    printf("hello from C: 6 * 7 = %d\\n", multiply(6, 7));
    return 0;
}
'''

MULTIPLY_H = "int multiply(int a, int b);\n"
MULTIPLY_C = '#include "multiply.h"\n\nint multiply(int a, int b) { return a * b; }\n'

HELLO_TEST = f'''\
#!/bin/sh
set -eu
out=$(./hello)
if [ "$out" != "{HELLO_OUTPUT.decode().rstrip()}" ]; then
    echo "unexpected output of hello: $out" >&2
    exit 1
fi
grep -qx '{REPORT.decode().rstrip()}' report.txt
[ "$(cat big.sha256)" = "{hashlib.sha256(BIG).hexdigest()}" ]
echo "hello_test: all good"
'''

FAIL_BUILD = f'''\
genrule(
    name = "bad",
    outs = ["bad.txt"],
    cmd = "echo '{FAIL_MARKER}' >&2; exit 3",
    tags = ["manual"],
)
'''

BAZELRC = '''\
# What Debian's Bazel (bazel-bootstrap) needs to build without a network.
build --nosandbox_debug
build --coverage_report_generator=//tools:coverage_report_generator
build --color=no --curses=no
build --jobs=8
build --remote_timeout=120
test --test_output=errors
# Remote-execution settings, written by the test that needs them.
try-import %workspace%/buildfleet.bazelrc
'''


@dataclass
class Workspace:
    root: Path  # the workspace directory (with WORKSPACE)

    @property
    def user_rc(self) -> Path:
        return self.root / "buildfleet.bazelrc"

    def expected_outputs(self) -> dict[str, bytes]:
        """bazel-bin path -> exact content."""
        return {
            "greeting.txt": GREETING,
            "shout.txt": SHOUT,
            "report.txt": REPORT,
            "big.bin": BIG,
            "big.sha256": hashlib.sha256(BIG).hexdigest().encode() + b"\n",
        }


def write_workspace(base: Path) -> Workspace:
    """Write the workspace and the rule stand-ins under `base`."""
    rules_cc, rules_java, ws = base / "rules_cc", base / "rules_java", base / "ws"
    for repo, package, rules in ((rules_cc, "cc", _CC_RULES), (rules_java, "java", _JAVA_RULES)):
        _write(repo / "WORKSPACE", f'workspace(name = "{repo.name}")\n')
        _write(repo / "BUILD", "")
        _write(repo / package / "defs.bzl", _forwarders(rules))
        _write(repo / package / "BUILD", "")
    _write(rules_cc / "cc" / "BUILD",
           'alias(\n    name = "toolchain_type",\n'
           '    actual = "@bazel_tools//tools/cpp:toolchain_type",\n'
           '    visibility = ["//visibility:public"],\n)\n')
    _write(ws / "WORKSPACE",
           'workspace(name = "buildfleet_e2e")\n\n'
           f'local_repository(name = "rules_cc", path = "{rules_cc}")\n'
           f'local_repository(name = "rules_java", path = "{rules_java}")\n')
    _write(ws / ".bazelrc", BAZELRC)
    _write(ws / "BUILD", BUILD)
    _write(ws / "tool.sh", TOOL, executable=True)
    _write(ws / "main.c", MAIN_C)
    _write(ws / "multiply.h", MULTIPLY_H)
    _write(ws / "multiply.c", MULTIPLY_C)
    _write(ws / "hello_test.sh", HELLO_TEST, executable=True)
    _write(ws / "fail" / "BUILD", FAIL_BUILD)
    _write(ws / "tools" / "BUILD",
           '# Bazel tests need a coverage report generator; this one does nothing.\n'
           'sh_binary(\n    name = "coverage_report_generator",\n'
           '    srcs = ["noop.sh"],\n    visibility = ["//visibility:public"],\n)\n')
    _write(ws / "tools" / "noop.sh", "#!/bin/sh\nexit 0\n", executable=True)
    return Workspace(ws)
