"""The shipped deployment files, checked offline: Kubernetes schemas (kubernetes-validate), the security
settings of every container, the drain arithmetic, both Envoy configurations (``envoy --mode validate``
and the same routing in each), and the Dockerfile (hadolint).

Security: a focused test of the settings the fleet promises (non-root, read-only root filesystem, no
privilege escalation, no capabilities, resources, no service-account token) rather than checkov, which
would pull a large dependency tree into the project for a handful of rules; these run in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fleetlib import ROOT
from seaweedlib import free_ports

from lorafleet_server.config import config_from_args
from lorafleet_server.grpc.server import CUT_MARGIN_SECONDS

sys.path.insert(0, str(ROOT / "scripts"))
import fleet as fleet_script  # scripts/fleet.py, what `make fleet` runs

KUBE = ROOT / "deploy" / "kubernetes"
BIN = Path(sys.executable).parent
PRE_STOP_SECONDS = 5


def documents(pattern: str = "**/*.yaml") -> list[dict[str, Any]]:
    """The manifests (``pattern`` under deploy/kubernetes: every one by default, examples included)."""
    docs = []
    for path in sorted(KUBE.glob(pattern)):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def one(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_every_manifest_matches_the_kubernetes_schema() -> None:
    docs = documents()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)  # raises ValidationError


def test_applying_the_directory_replaces_no_secret_and_no_replica_count() -> None:
    """`kubectl apply -f deploy/kubernetes/` applied placeholder Secrets over the real ones (every API key
    unknown within seconds, the S3 credentials gone) and reset an HPA-scaled fleet to 3 replicas."""
    applied = documents("*.yaml")
    assert not [d["metadata"]["name"] for d in applied if d["kind"] == "Secret"]
    scaled = {d["spec"]["scaleTargetRef"]["name"] for d in applied if d["kind"] == "HorizontalPodAutoscaler"}
    assert scaled == {"lorafleet"} and "replicas" not in one("Deployment", "lorafleet")["spec"]
    examples = {d["metadata"]["name"] for d in documents("examples/*.yaml") if d["kind"] == "Secret"}
    assert examples == {"lorafleet-s3", "lorafleet-keys"}


def test_envoy_drains_before_it_stops_and_sizes_its_workers() -> None:
    """A plain SIGTERM stopped Envoy at once (a stream 1.5 s in was cut), and without --concurrency it
    ran one worker per CPU of the node under a 1-CPU limit."""
    pod = one("Deployment", "lorafleet-envoy")["spec"]["template"]["spec"]
    [envoy] = pod["containers"]
    args = envoy["args"]
    assert args[args.index("--concurrency") + 1] == "1"
    drain_s = int(args[args.index("--drain-time-s") + 1])
    hook = " ".join(envoy["lifecycle"]["preStop"]["exec"]["command"])
    assert "drain_listeners?graceful" in hook
    slept = int(hook.rsplit("sleep", 1)[1])
    assert drain_s < slept < pod["terminationGracePeriodSeconds"]


def test_envoys_prestop_hook_drains_a_real_envoy(tmp_path: Path) -> None:
    """The hook first used wget, which Envoy's image lacks (a silent no-op), and `inboundonly`, which
    matched no listener. Run as written against this Envoy, with the manifest's config: the admin port
    answers 200 and the listener closes once the drain time is over."""
    import socket
    import time
    import urllib.request

    pod = one("Deployment", "lorafleet-envoy")["spec"]["template"]["spec"]
    hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    admin, listen = free_ports(2)  # the manifest's 9901 and 50050, moved to free ones
    text = one("ConfigMap", "lorafleet-envoy")["data"]["envoy.yaml"]
    text = text.replace("port_value: 9901", f"port_value: {admin}").replace(
        "port_value: 50050", f"port_value: {listen}"
    )
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    hook = [part.replace("127.0.0.1/9901", f"127.0.0.1/{admin}") for part in hook]
    args = ["-c", str(config), "--concurrency", "1", "--drain-time-s", "1", "--drain-strategy", "immediate"]
    envoy = subprocess.Popen(
        # a base id of its own: a fixed one collided with any other Envoy on the machine (a second test run)
        [str(BIN / "envoy"), *args, "--use-dynamic-base-id"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and envoy.poll() is None, "Envoy did not start"
                time.sleep(0.2)
        posted = subprocess.run(
            [*hook[:-1], hook[-1].rsplit(";", 1)[0]], capture_output=True, text=True, timeout=10, check=True
        )
        assert posted.stdout.startswith("HTTP/1.1 200")
        # the listener closes after the 1 s drain: polled (a fixed 2.5 s wait failed on a loaded machine)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=2).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline, "Envoy still listens 15 s after the preStop hook's drain"
            time.sleep(0.1)
    finally:
        envoy.terminate()
        envoy.wait(10)


def test_schema_check_rejects_a_broken_manifest() -> None:
    deployment = one("Deployment", "lorafleet")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.37.0", strict=True)


@pytest.mark.parametrize("name", ["lorafleet", "lorafleet-envoy"])
def test_containers_run_locked_down(name: str) -> None:
    pod = one("Deployment", name)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True, container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc.get("privileged", False) is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), container["name"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]) <= set(container["resources"]["limits"])
        assert ":" in container["image"] and not container["image"].endswith(":latest")


def test_replicas_drain_within_the_grace_period_and_probe_grpc() -> None:
    settings = one("ConfigMap", "lorafleet-config")["data"]
    pod = one("Deployment", "lorafleet")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRE_STOP_SECONDS)]
    drain = float(settings["LORAFLEET_DRAIN_SECONDS"]) + float(settings["LORAFLEET_SHUTDOWN_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > PRE_STOP_SECONDS + drain + CUT_MARGIN_SECONDS
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051, probe
    # Liveness must not kill a draining pod (health reads NOT_SERVING for the whole drain).
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain
    service = one("Service", "lorafleet-headless")
    assert service["spec"]["clusterIP"] == "None"
    labels = pod_labels = one("Deployment", "lorafleet")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert one("PodDisruptionBudget", "lorafleet")["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_settings_are_server_settings() -> None:
    """Every LORAFLEET_* of the ConfigMap and the Deployment parses as `lorafleet serve` reads it."""
    settings = dict(one("ConfigMap", "lorafleet-config")["data"])
    [container] = one("Deployment", "lorafleet")["spec"]["template"]["spec"]["containers"]
    settings |= {e["name"]: e.get("value", "pod-name") for e in container["env"]}
    config = config_from_args(argparse.Namespace(), environ=settings)
    for key in settings:
        field = key.removeprefix("LORAFLEET_").lower()
        assert hasattr(config, field), key
    assert config.host == "0.0.0.0" and config.replica_id == "pod-name"
    # The Service named lorafleet would otherwise add LORAFLEET_PORT=tcp://10.0.0.1:50050 and the like
    # (Docker-link variables) to this pod's environment, where the server reads them as its settings.
    one("Service", "lorafleet")  # (envoy.yaml)
    assert one("Deployment", "lorafleet")["spec"]["template"]["spec"]["enableServiceLinks"] is False
    assert str(config.keys_path).startswith(container["volumeMounts"][0]["mountPath"])


def test_autoscaler_reads_the_waiting_requests_gauge() -> None:
    from prometheus_client import CollectorRegistry

    from lorafleet_server.metrics import Metrics

    hpa = one("HorizontalPodAutoscaler", "lorafleet")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lorafleet"}
    [metric] = hpa["metrics"]
    registry = CollectorRegistry()
    Metrics(registry)
    names = {m.name for m in registry.collect()}
    assert metric["pods"]["metric"]["name"] in names


def _envoy_check(config_text: str, tmp_path: Path, name: str) -> dict[str, Any]:
    path = tmp_path / name
    path.write_text(config_text)
    out = subprocess.run(
        [str(BIN / "envoy"), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    loaded: dict[str, Any] = yaml.safe_load(config_text)
    return loaded


def _hcm(config: dict[str, Any], listener: str) -> dict[str, Any]:
    """The HTTP connection manager of the listener named ``listener``."""
    [found] = [x for x in config["static_resources"]["listeners"] if x["name"] == listener]
    hcm: dict[str, Any] = found["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _routing(config: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The parts that decide where a request goes, by listener: its route and its cluster without the
    endpoints."""
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    routing = {}
    for listener in config["static_resources"]["listeners"]:
        route_config = _hcm(config, listener["name"])["route_config"]
        [cluster] = {r["route"]["cluster"] for h in route_config["virtual_hosts"] for r in h["routes"]}
        kept = {
            k: v
            for k, v in clusters[cluster].items()
            if k not in ("type", "load_assignment", "dns_refresh_rate", "respect_dns_ttl")
        }
        routing[listener["name"]] = (json.dumps(route_config, sort_keys=True), json.dumps(kept, sort_keys=True))
    return routing


def test_envoy_configs_validate_and_route_alike(tmp_path: Path) -> None:
    local_text = fleet_script.render_envoy(50050, 9901, [("replica-0", 50051)], 8080, [("replica-0", 8000)])
    local = _envoy_check(local_text, tmp_path, "local.yaml")
    kube = _envoy_check(one("ConfigMap", "lorafleet-envoy")["data"]["envoy.yaml"], tmp_path, "kube.yaml")
    assert _routing(local) == _routing(kube)
    assert set(_routing(local)) == {"grpc", "http"}
    route, cluster = _routing(local)["grpc"]
    assert '"header_name": "x-lorafleet-adapter"' in route and '"unavailable,' in route
    assert '"RING_HASH"' in cluster and '"hash_balance_factor": 150' in cluster and "grpc_health_check" in cluster
    # a replica's whole batch may retry at once (Envoy's default allows 3 concurrent retries)
    assert '"min_retry_concurrency": 64' in cluster
    # The OpenAI-compatible API: the same affinity, HTTP health checks on /health (503 while draining).
    route, cluster = _routing(local)["http"]
    assert '"header_name": "x-lorafleet-adapter"' in route and '"retriable_status_codes": [503]' in route
    assert '"RING_HASH"' in cluster and '"path": "/health"' in cluster and "grpc" not in cluster
    # Found by an outside review: Envoy's default stream idle timeout (300 s) ended unary Generate
    # calls that ran longer ("stream timeout"), since a unary call sends nothing until it ends. A
    # non-streaming HTTP completion is the same.
    for config in (local, kube):
        for listener in ("grpc", "http"):
            assert _hcm(config, listener)["stream_idle_timeout"] == "0s"


def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    # A VOLUME path the image lacks is created root-owned: the server (uid 10001) could not write its store.
    [volume] = re.findall(r'^VOLUME \["([^"]+)"\]', text, re.MULTILINE)
    before = text[: text.index("VOLUME [")]
    assert f"mkdir -p {volume}" in before and "chown -R lorafleet /data" in before and volume.startswith("/data/")
    assert 'CMD ["python", "-m", "lorafleet_server.grpc.healthcheck"]' in text
    # Every file a COPY takes from the build context is in the repository (and not in .dockerignore's
    # leading entries, which hold what a checkout builds: venvs, data, caches).
    ignored = (ROOT / ".dockerignore").read_text().split()
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for source in sources.split():
            assert (ROOT / source).exists() and source not in ignored, source


def test_envoys_body_limit_is_the_replicas_message_limit() -> None:
    """Envoy's HTTP listener holds each body whole and refuses one over its limit itself; a limit below
    the replicas' --max-message-bytes would refuse bodies they take, one above would send them bodies
    they refuse (whose refusal resets the connection, counted against them). Both Envoy configurations
    and the replicas' settings (ServerConfig's default, or the Kubernetes ConfigMap's) must agree."""
    settings = dict(one("ConfigMap", "lorafleet-config")["data"])
    replicas = config_from_args(argparse.Namespace(), environ=settings).max_message_bytes
    local = yaml.safe_load(fleet_script.render_envoy(50050, 9901, [], 8080, []))
    kube = yaml.safe_load(one("ConfigMap", "lorafleet-envoy")["data"]["envoy.yaml"])
    for config in (local, kube):
        [http] = [x for x in config["static_resources"]["listeners"] if x["name"] == "http"]
        filters = http["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        [buffer] = [f for f in filters if f["name"] == "envoy.filters.http.buffer"]
        assert buffer["typed_config"]["max_request_bytes"] == replicas
