"""What the fleet tests share: the running fleet's addresses and how to publish into its store."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLEET_SCRIPT = ROOT / "scripts" / "fleet.py"
PYTHON = sys.executable
POLL_SECONDS = 1.0
# The fleet's adapter store: the S3 bucket (SeaweedFS) as `make fleet` runs it; `FLEET_STORE=local`
# (a shared directory) only to tell a routing failure from a store failure.
STORE = os.environ.get("FLEET_STORE", "s3")
DRAIN_SECONDS = 2.0


@dataclass
class LiveFleet:
    dir: Path
    target: str
    env: dict[str, str]  # what `. DIR/env` exports
    replicas: dict[str, int]  # replica id -> its own gRPC port
    pids: dict[str, int]  # replica id -> pid
    tenant_key: str
    other_key: str  # a key of another tenant
    http_target: str  # the OpenAI-compatible API through Envoy: http://HOST:PORT

    def publish(self, src: Path, *refs: str) -> list[str]:
        """`lorafleet adapters import SRC REF` for each ref, in one process, with the fleet's environment
        (as a user does after `. .fleet/env`); returns the published "tenant/name@version"s."""
        code = (
            "import sys\nfrom lorafleet_server.cli import main\n"
            "for ref in sys.argv[2:]:\n    assert main(['adapters', 'import', sys.argv[1], ref]) == 0\n"
        )
        out = subprocess.run(
            [PYTHON, "-c", code, str(src), *refs],
            env=os.environ | self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return [line.split()[-1] for line in out.stdout.splitlines() if line.startswith("published ")]


def fleet_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, str(FLEET_SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
