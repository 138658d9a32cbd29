"""Every command and every option of the CLI says what it is for (``--help``)."""

from __future__ import annotations

from collections.abc import Iterator

import click
from click.testing import CliRunner

from creditgate.cli import main


def _commands(
    command: click.Command, path: tuple[str, ...] = ("creditgate",)
) -> Iterator[tuple[str, click.Command]]:
    yield " ".join(path), command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _commands(sub, (*path, name))


def test_every_command_and_option_has_help() -> None:
    missing = []
    for path, command in _commands(main):
        if not (command.help or command.short_help):
            missing.append(f"{path}: no help")
        missing += [
            f"{path} {param.opts[0]}: no help"
            for param in command.params
            if isinstance(param, click.Option) and not param.help
        ]

    assert not missing, "\n".join(missing)


def test_every_help_page_renders() -> None:
    runner = CliRunner()
    for path, _ in _commands(main):
        result = runner.invoke(main, [*path.split()[1:], "--help"])

        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(main, ["--version"])

    assert result.exit_code == 0
    assert result.output.strip() == f"creditgate, version {version('creditgate')}"
