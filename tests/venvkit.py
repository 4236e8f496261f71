"""Virtual environments for clients nobody here wrote (BuildGrid's `bgd`, BuildStream's
`bst`), each with its own interpreter and pinned package, built once in a cache outside
the repository (``~/.cache/buildfleet-tests/NAME-venv-VERSION``, or under
$XDG_CACHE_HOME) and reused while it works.

An environment is built in a temporary directory next to that path and renamed into
place, so parallel runs never see a half-built one.  A renamed venv's console
scripts keep their old ``#!`` line: run the tools as ``VENV/bin/python -c ...``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from procutil import find_python


@dataclass(frozen=True)
class PinnedClient:
    distribution: str  # the PyPI name, installed at `version`
    version: str
    module: str  # imported to check that the environment works
    min_python: tuple[int, int] = (3, 11)
    name: str = ""  # of the cached environment (default: the distribution's)

    @property
    def venv(self) -> Path:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return (Path(base) / "buildfleet-tests"
                / f"{self.name or self.distribution}-venv-{self.version}")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _works(client: PinnedClient, venv: Path) -> bool:
    """Whether `venv` has the client at its version and its module imports."""
    python = venv_python(venv)
    if not python.exists():
        return False
    check = (f"import importlib.metadata as m, {client.module}; "
             f"print(m.version({client.distribution!r}))")
    try:
        result = subprocess.run([str(python), "-c", check], capture_output=True, text=True,
                                timeout=120, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip() == client.version


def _run_setup(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        pytest.fail(f"{what} failed ({result.returncode}): {' '.join(command)}\n"
                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")


def ensure_venv(client: PinnedClient) -> Path:
    """The client's environment: built the first time, then reused.  Skips, saying why,
    when no interpreter is new enough."""
    final = client.venv
    if _works(client, final):
        return final
    python = find_python(*client.min_python)
    if python is None:
        pytest.skip(f"{client.distribution} {client.version} needs Python >= "
                    f"{client.min_python[0]}.{client.min_python[1]}; none found on PATH or "
                    "under pyenv")
    final.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}-building-", dir=final.parent))
    building.chmod(0o755)
    wanted = f"{client.distribution}=={client.version}"
    try:
        _run_setup([python, "-m", "venv", str(building)], f"creating the {wanted} venv")
        _run_setup([str(venv_python(building)), "-m", "pip", "install",
                    "--disable-pip-version-check", "--quiet", wanted], f"pip install {wanted}")
        if not _works(client, building):
            pytest.fail(f"{wanted} installed in {building} does not import")
        if final.exists() and not _works(client, final):
            shutil.rmtree(final, ignore_errors=True)  # a broken leftover
        try:
            building.rename(final)
        except OSError:
            if not _works(client, final):  # not another run winning the race: a real error
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    if not _works(client, final):
        pytest.fail(f"the {wanted} venv at {final} does not work after creation")
    return final
