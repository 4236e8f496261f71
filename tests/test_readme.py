"""The README is part of the interface: its configuration examples must be
accepted as written, and every command-line option its tables name must exist."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import yaml

from buildfleet.auth.tokens import parse as parse_tokens
from buildfleet.cli import main
from buildfleet.config import parse_config
from buildfleet.server.app import check_exposure

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


YAML_BLOCKS = _blocks("yaml")


def test_the_readme_has_configuration_examples() -> None:
    assert len(YAML_BLOCKS) >= 6


@pytest.mark.parametrize("text", YAML_BLOCKS, ids=[f"yaml{i}" for i in range(len(YAML_BLOCKS))])
def test_every_yaml_example_is_accepted(text: str) -> None:
    document = yaml.safe_load(text)
    if set(document) == {"tokens"}:
        assert parse_tokens(text.encode()), "a tokens file with no entries"
    else:
        # and none of them is a server that other machines may use unauthenticated
        check_exposure(parse_config(document, "README example"))


def _options(command: click.Command) -> set[str]:
    return {name for param in command.params for name in getattr(param, "opts", [])}


def _table_options(heading: str) -> list[str]:
    """The options named in the first column of the table that follows `heading`."""
    start = README.index(heading)
    rows = re.search(r"\n\| option \| meaning \|\n\| --- \| --- \|\n((?:\|.*\n)+)",
                     README[start:])
    assert rows is not None, f"no option table after {heading!r}"
    names: list[str] = []
    for row in rows.group(1).splitlines():
        names += re.findall(r"`(--[a-z-]+)", row.split("|")[1])
    return names


@pytest.mark.parametrize(("heading", "command"), [
    ("`buildfleet bot` runs actions", "bot"),
    ("`buildfleet serve [OPTIONS]`", "serve"),
    ("`buildfleet up [OPTIONS]`", "up"),
])
def test_every_documented_option_exists(heading: str, command: str) -> None:
    assert isinstance(main, click.Group)
    documented = _table_options(heading)
    assert documented
    missing = [name for name in documented if name not in _options(main.commands[command])]
    assert not missing, f"the README documents options `buildfleet {command}` lacks: {missing}"
