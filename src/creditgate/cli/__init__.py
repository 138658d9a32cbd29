"""The ``creditgate`` command line (``creditgate --help``).

``root`` holds the group and renders expected failures as one line; the commands live in
``local`` (the dev stack, topics, the worker), ``reads`` (from Redis), ``licensing``
(license commands over Kafka), and beside the code they run (``rebuild``, ``contracts``).
"""

from __future__ import annotations

import click

from creditgate.cli import holds, licensing, local, reads  # noqa: F401 - registers their commands
from creditgate.cli.root import main

__all__ = ["main"]

# ---- the demo --------------------------------------------------------------------


@main.command()
@click.option(
    "--keep",
    is_flag=True,
    help="keep the stack and the worker up afterwards, to look at the console with the "
    "demo's data (Ctrl-C stops them)",
)
def demo(keep: bool) -> None:
    """Play a scenario through the real pipeline and print what happened."""
    from creditgate.demo import run_demo

    run_demo(keep=keep)


def _register_commands() -> None:
    """Commands that live beside the code they run."""
    from creditgate.contracts import contracts_command
    from creditgate.rebuild import rebuild_command

    main.add_command(rebuild_command, "rebuild")
    main.add_command(contracts_command, "contracts")


_register_commands()

if __name__ == "__main__":
    main()
