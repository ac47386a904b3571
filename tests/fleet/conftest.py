"""One real fleet per module, started by the same script and Envoy template as `make fleet`
(scripts/fleet.py, deploy/envoy/envoy.yaml.tmpl): an S3 store, three replicas, Envoy on a free port."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fleetlib import DRAIN_SECONDS, POLL_SECONDS, STORE, LiveFleet, fleet_command

from lorafleet_server.tenants.keys import PepperSource, create_key


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Iterator[LiveFleet]:
    state = tmp_path_factory.mktemp("fleet")
    keys_file = state / "keys.json"
    pepper = PepperSource(keys_file)
    now = datetime.now(UTC)
    tenant = create_key(keys_file, pepper, tenant="acme", role="tenant", now=now)
    other = create_key(keys_file, pepper, tenant="globex", role="tenant", now=now)
    up = fleet_command(
        "up",
        f"--dir={state}",
        "--port=0",
        f"--store={STORE}",
        f"--model={default_model_dir}",
        f"--keys-file={keys_file}",
        f"--poll-seconds={POLL_SECONDS}",
        f"--drain-seconds={DRAIN_SECONDS}",
        "--serve-arg=--max-new-tokens=8",
        "--serve-arg=--default-max-new-tokens=2",
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr + _logs(state)
        info = json.loads((state / "fleet.json").read_text())
        env = dict(  # the file is shell: its values are quoted
            shlex.split(line.removeprefix("export "))[0].split("=", 1)
            for line in (state / "env").read_text().splitlines()
            if line
        )
        yield LiveFleet(
            dir=state,
            target=info["target"],
            env=env,
            replicas={r["replica_id"]: r["port"] for r in info["replicas"]},
            pids={r["replica_id"]: r["pid"] for r in info["replicas"]},
            tenant_key=tenant.key,
            other_key=other.key,
            http_target=info["http_target"],
        )
    finally:
        down = fleet_command("down", f"--dir={state}", "--grace=5")  # the replicas drain in 2 s; then SIGKILL
        assert down.returncode == 0, down.stderr
        assert not list((state / "pids").glob("*.pid"))


def _logs(state: Path) -> str:
    return "".join(f"\n--- {log.name}\n{log.read_text()[-2000:]}" for log in sorted(state.glob("*.log")))
