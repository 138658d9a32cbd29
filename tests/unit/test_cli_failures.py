"""The real CLI (a subprocess) meeting what a user meets: nothing listening, bad settings.

Each expected failure is one ``error:`` line on stderr, exit status 1, no traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import creditgate

SRC = Path(creditgate.__file__).resolve().parents[1]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: every connection to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CREDITGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "creditgate", *args],
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(SRC), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ")
    for word in words:
        assert word in line, line
    return line


def test_topics_check_without_kafka(tmp_path: Path, closed_port: int) -> None:
    result = run_cli(
        "topics", "check", cwd=tmp_path, CREDITGATE_KAFKA_BOOTSTRAP=f"127.0.0.1:{closed_port}"
    )

    assert_one_clear_line(
        result, f"127.0.0.1:{closed_port}", "creditgate dev up", "CREDITGATE_KAFKA_BOOTSTRAP"
    )


def test_credits_without_redis(tmp_path: Path, closed_port: int) -> None:
    result = run_cli(
        "credits",
        "acme",
        cwd=tmp_path,
        CREDITGATE_REDIS_URL=f"redis://:a-password@127.0.0.1:{closed_port}/0",
    )

    line = assert_one_clear_line(
        result, f"127.0.0.1:{closed_port}", "creditgate dev up", "CREDITGATE_REDIS_URL"
    )
    assert "a-password" not in line


def test_a_license_command_without_kafka(tmp_path: Path, closed_port: int) -> None:
    result = run_cli(
        "member",
        "upsert",
        "acme",
        "u-1",
        "--wait",
        "1",
        cwd=tmp_path,
        CREDITGATE_KAFKA_BOOTSTRAP=f"127.0.0.1:{closed_port}",
    )

    assert_one_clear_line(result, f"127.0.0.1:{closed_port}", "creditgate dev up")


def test_a_bad_setting_is_named_without_its_value(tmp_path: Path) -> None:
    result = run_cli("credits", "acme", cwd=tmp_path, CREDITGATE_HTTP_PORT="not-a-port")

    line = assert_one_clear_line(result, "CREDITGATE_HTTP_PORT", "valid integer")
    assert "not-a-port" not in line


def test_settings_come_from_the_devstack_env_file(tmp_path: Path, closed_port: int) -> None:
    (tmp_path / ".devstack").mkdir()
    (tmp_path / ".devstack" / "env").write_text(
        f"# written by `creditgate dev up`\nCREDITGATE_KAFKA_BOOTSTRAP=127.0.0.1:{closed_port}\n"
    )

    from_file = run_cli("topics", "check", cwd=tmp_path)
    assert_one_clear_line(from_file, f"127.0.0.1:{closed_port}")

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        elsewhere = other.getsockname()[1]
        from_env = run_cli(
            "topics", "check", cwd=tmp_path, CREDITGATE_KAFKA_BOOTSTRAP=f"127.0.0.1:{elsewhere}"
        )
    line = assert_one_clear_line(from_env, f"127.0.0.1:{elsewhere}")
    assert str(closed_port) not in line


@pytest.mark.parametrize(
    "args",
    [
        ("usage", "acme"),
        ("charges", "acme", "u-1", "--action", "export"),
        ("topics", "apply"),
        ("credits", "grant", "acme", "--credits", "5", "--reason", "r", "--granted-by", "me"),
        ("rebuild",),
    ],
)
def test_other_commands_without_the_stack(
    tmp_path: Path, closed_port: int, args: tuple[str, ...]
) -> None:
    result = run_cli(
        *args,
        cwd=tmp_path,
        CREDITGATE_KAFKA_BOOTSTRAP=f"127.0.0.1:{closed_port}",
        CREDITGATE_REDIS_URL=f"redis://127.0.0.1:{closed_port}/0",
    )

    assert_one_clear_line(result, f"127.0.0.1:{closed_port}", "creditgate dev up")
