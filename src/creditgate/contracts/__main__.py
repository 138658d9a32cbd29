"""``python -m creditgate.contracts``: the same as ``creditgate contracts``."""

from creditgate.contracts import contracts_command

contracts_command()
