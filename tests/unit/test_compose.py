"""docker-compose.yml: the production-like choices an operator relies on.

No Docker engine runs on our machines, so this reads the file as data; where the
``docker compose`` plugin exists, ``docker compose config -q`` validates it too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    found: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return found


def test_redis_keeps_an_append_only_file(services: dict[str, Any]) -> None:
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "healthcheck" in services["redis"]


def test_kafka_never_creates_topics_by_itself(services: dict[str, Any]) -> None:
    assert services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "healthcheck" in services["kafka"]


def test_two_ready_checked_worker_replicas_expose_metrics(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 2
    assert "/ready" in " ".join(worker["healthcheck"]["test"])
    assert "6066" in worker["expose"]
    assert "CREDITGATE_API_TOKENS" in worker["environment"]
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
        != 0
    ):
        pytest.skip("the docker compose plugin is not installed here")
    done = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
        env={"CREDITGATE_API_TOKENS": '{"x":"*"}', "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr


def test_the_production_profile_has_three_brokers_a_redis_cluster_and_two_workers(
    services: dict[str, Any],
) -> None:
    production = {name for name, s in services.items() if "production" in s.get("profiles", [])}
    brokers = {name for name in production if name.startswith("kafka-")}
    assert len(brokers) == 3
    voters = services["kafka-1"]["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voters.count("@") == 3
    for broker in brokers:
        assert services[broker]["environment"]["KAFKA_MIN_INSYNC_REPLICAS"] == 2
    redis_nodes = [name for name in production if name.startswith("redis-") and name[-1].isdigit()]
    assert len(redis_nodes) == 6
    for node in redis_nodes:
        command = services[node]["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes"
        assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--cluster-replicas 1" in " ".join(services["redis-cluster"]["command"])
    worker = services["cluster-worker"]
    assert worker["deploy"]["replicas"] == 2
    assert worker["environment"]["CREDITGATE_REDIS_CLUSTER"] == "true"
    assert worker["environment"]["CREDITGATE_KAFKA_BOOTSTRAP"].count(",") == 2
