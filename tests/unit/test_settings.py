"""Settings: ``CREDITGATE_*`` variables, then ``.devstack/env``; secrets stay secret."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from creditgate.settings import ENV_FILE, ENV_FILE_VARIABLE, Settings


@pytest.fixture
def env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("CREDITGATE_KAFKA_BOOTSTRAP", "CREDITGATE_REDIS_URL", "CREDITGATE_REDIS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_FILE_VARIABLE)  # the default file, relative to the directory
    path = tmp_path / ENV_FILE
    path.parent.mkdir()
    path.write_text(
        "# written by `creditgate dev up`\n"
        "CREDITGATE_KAFKA_BOOTSTRAP=127.0.0.1:19092\n"
        "CREDITGATE_REDIS_URL=rediss://127.0.0.1:16379/0\n"
        "CREDITGATE_REDIS_PASSWORD=from-the-file\n"
        "KAFKA_BOOTSTRAP=not-ours\n"
    )
    return path


def test_the_env_file_fills_what_the_environment_leaves_unset(env_file: Path) -> None:
    settings = Settings()

    assert settings.kafka_bootstrap == "127.0.0.1:19092"
    assert settings.redis_url.get_secret_value() == "rediss://127.0.0.1:16379/0"
    assert isinstance(settings.redis_password, SecretStr)
    assert settings.redis_password.get_secret_value() == "from-the-file"
    assert "from-the-file" not in repr(settings)
    assert "from-the-file" not in str(settings.safe_dump())


def test_the_environment_wins_over_the_env_file(
    env_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDITGATE_KAFKA_BOOTSTRAP", "kafka.internal:9092")

    assert Settings().kafka_bootstrap == "kafka.internal:9092"


def test_without_the_file_the_defaults_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDITGATE_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.delenv(ENV_FILE_VARIABLE)
    monkeypatch.chdir(tmp_path)

    assert Settings().kafka_bootstrap == "127.0.0.1:9092"


def test_an_empty_env_file_variable_reads_no_file(
    env_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_FILE_VARIABLE, "")

    assert Settings().kafka_bootstrap == "127.0.0.1:9092"


def test_the_env_file_variable_names_another_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDITGATE_KAFKA_BOOTSTRAP", raising=False)
    other = tmp_path / "staging.env"
    other.write_text("CREDITGATE_KAFKA_BOOTSTRAP=kafka.staging:9092\n")
    monkeypatch.setenv(ENV_FILE_VARIABLE, str(other))

    assert Settings().kafka_bootstrap == "kafka.staging:9092"
