"""Metrics as SREs get them: a real scrape, promtool, a real Prometheus server, the Grafana board."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from e2elib import LiveServer

from lorafleet import LoraFleetError, Message, Sampling

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: scripts/install_prometheus.sh installs it")
        pytest.skip(f"{name} is not installed (scripts/install_prometheus.sh)")
    return path


def scrape(live: LiveServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{live.metrics_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, val = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(val)
    return 0.0


def scrape_until(live: LiveServer, done: Callable[[str], bool], timeout: float = 10.0) -> str:
    """Scrape until ``done(text)`` holds, or return the last scrape after ``timeout`` seconds. A call is
    counted when its handler unwinds on the server (edge/observe.py), which for an aborted call can be
    just after the client has its status."""
    give_up = time.monotonic() + timeout
    text = scrape(live)
    while not done(text) and time.monotonic() < give_up:
        time.sleep(0.05)
        text = scrape(live)
    return text


def test_scrape_passes_promtool_and_counts_requests(live: LiveServer) -> None:
    before = scrape(live)
    live.client.generate("Hello", sampling=Sampling(max_new_tokens=3))
    with pytest.raises(LoraFleetError):
        live.client.generate("Hello", adapter="../x")
    ok = "lorafleet_requests_total"
    want_ok = sample(before, ok, rpc="Generate", code="OK") + 1
    want_invalid = sample(before, ok, rpc="Generate", code="INVALID_ARGUMENT") + 1
    after = scrape_until(
        live,
        lambda text: sample(text, ok, rpc="Generate", code="OK") >= want_ok
        and sample(text, ok, rpc="Generate", code="INVALID_ARGUMENT") >= want_invalid,
    )
    # exactly one more of each: nothing counted twice
    assert sample(after, ok, rpc="Generate", code="OK") == want_ok
    assert sample(after, ok, rpc="Generate", code="INVALID_ARGUMENT") == want_invalid
    assert sample(after, "lorafleet_generated_tokens_total") >= sample(before, "lorafleet_generated_tokens_total") + 3
    checked = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=after, text=True, capture_output=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_codes_alerts_select_are_exported_from_the_start() -> None:
    """Every status code an alert selects on lorafleet_requests_total has its series at 0 from a
    server's start (metrics.WATCHED_CODES): a code added to an alert must be added there too, or the
    first such failure after a start is missed by ``rate``."""
    from lorafleet_server.metrics import WATCHED_CODES

    rules = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    selectors = re.findall(r"lorafleet_requests_total\{([^}]*)\}", rules)
    selected = [m for s in selectors for m in re.findall(r'\bcode=~?"([A-Z_|]+)"', s)]
    assert len(selected) >= 2, selected  # the error ratio's and the deadlines'
    assert {code for codes in selected for code in codes.split("|")} <= set(WATCHED_CODES)


def test_alert_rules_pass_promtool() -> None:
    out = subprocess.run(
        [tool("promtool"), "check", "rules", str(ROOT / "deploy/prometheus/alerts.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for alert in (
        "TimeToFirstToken",
        "TimePerOutputToken",
        "WaitingRequests",
        "NoProgress",
        "ErrorRatio",
        "DeadlinesExceeded",
        "AdapterLoadFailures",
        "AdapterSwapFailures",
        "AdapterStoreUnreachable",
        "Down",
    ):
        assert alert in (ROOT / "deploy/prometheus/alerts.yml").read_text()


def rendered(alertname: str, instance: str, value: str) -> dict[str, str]:
    """The annotations of rule ``alertname`` as Prometheus renders them for ``instance`` at ``value``."""
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    [alert] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == alertname]
    return {
        "summary": alert["annotations"]["summary"].replace("{{ $labels.instance }}", instance),
        "description": alert["annotations"]["description"].replace("{{ $value | humanizePercentage }}", value),
    }


def promtool_test(tmp_path: Path, input_series: list[dict[str, str]], checks: list[dict[str, Any]]) -> None:
    """`promtool test rules` of alerts.yml on ``input_series`` (one sample a minute) with the alert
    ``checks``; it must pass."""
    test = {
        "rule_files": [str(ROOT / "deploy/prometheus/alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input_series, "alert_rule_test": checks}],
    }
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(test))
    out = subprocess.run([tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def promtool_rule_test(tmp_path: Path, series: dict[tuple[str, str], str], checks: list[dict[str, Any]]) -> None:
    """`promtool test rules` of alerts.yml: ``series`` are request counters by (instance, code)."""
    input_series = [
        {"series": f'lorafleet_requests_total{{instance="{i}", rpc="Generate", code="{c}"}}', "values": v}
        for (i, c), v in series.items()
    ]
    promtool_test(tmp_path, input_series, checks)


def test_error_alert_pages_on_the_servers_failures_only(tmp_path: Path) -> None:
    """`promtool test rules`: a replica answering 90% UNAUTHENTICATED (a scanner with bad keys) and
    PERMISSION_DENIED / RESOURCE_EXHAUSTED / INVALID_ARGUMENT / DEADLINE_EXCEEDED (a client's own too
    short deadline) does not page; one failing a third of its
    calls with INTERNAL does. The caller codes used to count, so a scanner could page at night."""
    series = {
        ("scanned", "OK"): "0+10x30",
        ("scanned", "UNAUTHENTICATED"): "0+100x30",
        ("scanned", "PERMISSION_DENIED"): "0+10x30",
        ("scanned", "RESOURCE_EXHAUSTED"): "0+10x30",
        ("scanned", "INVALID_ARGUMENT"): "0+10x30",
        ("scanned", "DEADLINE_EXCEEDED"): "0+10x30",  # the caller's deadline, too short for its requests
        ("failing", "OK"): "0+10x30",
        ("failing", "INTERNAL"): "0+5x30",
    }
    annotations = rendered("LorafleetErrorRatioHigh", "failing", "33.33%")  # 5 of 15 calls
    page = {"exp_labels": {"severity": "page", "instance": "failing"}, "exp_annotations": annotations}
    promtool_rule_test(
        tmp_path, series, [{"eval_time": "20m", "alertname": "LorafleetErrorRatioHigh", "exp_alerts": [page]}]
    )


def test_a_stalled_engine_pages_and_a_busy_or_idle_one_does_not(tmp_path: Path) -> None:
    """Found by an outside review: a replica whose engine stopped with rows held (health SERVING, token
    counters flat) fired no alert (TTFT and TPOT see only requests that get tokens). A busy replica
    serving only embeddings (prompt tokens, no generated ones), and an idle one, must not page."""
    running, generated, prompt = (
        "lorafleet_running_requests",
        "lorafleet_generated_tokens_total",
        "lorafleet_prompt_tokens_total",
    )
    input_series = [
        {"series": f'{running}{{instance="stuck"}}', "values": "32x30"},
        {"series": f'{generated}{{instance="stuck"}}', "values": "0+100x5 500x25"},  # stops at 5m
        {"series": f'{prompt}{{instance="stuck"}}', "values": "0+50x5 250x25"},
        {"series": f'{running}{{instance="embedding"}}', "values": "4x30"},
        {"series": f'{generated}{{instance="embedding"}}', "values": "0x30"},
        {"series": f'{prompt}{{instance="embedding"}}', "values": "0+400x30"},
        {"series": f'{running}{{instance="idle"}}', "values": "0x30"},
        {"series": f'{generated}{{instance="idle"}}', "values": "7x30"},
        {"series": f'{prompt}{{instance="idle"}}', "values": "9x30"},
    ]
    checks = [
        {"eval_time": "8m", "alertname": "LorafleetNoProgress", "exp_alerts": []},  # not yet 5m flat + 5m
        {
            "eval_time": "20m",
            "alertname": "LorafleetNoProgress",
            "exp_alerts": [
                {
                    "exp_labels": {"severity": "page", "instance": "stuck"},
                    "exp_annotations": {
                        "summary": "lorafleet server stuck holds requests but computes nothing",
                        "description": "32 requests hold rows while no token was generated or read for "
                        "10 minutes: a stalled engine. Health may still say SERVING; TTFT and TPOT see "
                        "only requests that get tokens.",
                    },
                }
            ],
        },
    ]
    promtool_test(tmp_path, input_series, checks)


def test_deadlines_exceeded_warn_without_paging(tmp_path: Path) -> None:
    """DEADLINE_EXCEEDED left the page (a caller's short deadline must not wake anyone), but a stuck
    engine's admin calls end with it too: half the calls timing out is a warning, not silence."""
    series = {("slow", "OK"): "0+10x40", ("slow", "DEADLINE_EXCEEDED"): "0+10x40"}
    annotations = rendered("LorafleetDeadlinesExceeded", "slow", "50%")
    warning = {"exp_labels": {"severity": "warning", "instance": "slow"}, "exp_annotations": annotations}
    promtool_rule_test(
        tmp_path,
        series,
        [
            {"eval_time": "30m", "alertname": "LorafleetErrorRatioHigh", "exp_alerts": []},
            {"eval_time": "30m", "alertname": "LorafleetDeadlinesExceeded", "exp_alerts": [warning]},
        ],
    )


def test_a_store_that_stopped_answering_warns_and_an_idle_one_does_not(tmp_path: Path) -> None:
    """Found by an outside review: a replica whose store calls all failed (rotated credentials) kept
    serving old versions with nothing but a log line to show for it. The gauge says when the store
    last answered; with its calls failing for 5 minutes the replica warns. One whose store answers, or
    that has not called it lately (no failures), does not."""
    answered = "lorafleet_adapter_store_last_answer_timestamp_seconds"
    failed = "lorafleet_adapter_store_unavailable_total"
    input_series = [  # values at 0m, 1m, ...: the answer time stops moving at 2m (120 s) on "cut"
        {"series": f'{answered}{{instance="cut"}}', "values": "60 120 120x20"},
        {"series": f'{failed}{{instance="cut"}}', "values": "0 0 0+12x20"},
        {"series": f'{answered}{{instance="fine"}}', "values": "60+60x21"},
        {"series": f'{failed}{{instance="fine"}}', "values": "0x21"},
        {"series": f'{answered}{{instance="idle"}}', "values": "60 120 120x20"},
        {"series": f'{failed}{{instance="idle"}}', "values": "0x21"},
    ]
    checks = [
        {"eval_time": "5m", "alertname": "LorafleetAdapterStoreUnreachable", "exp_alerts": []},
        {
            "eval_time": "10m",
            "alertname": "LorafleetAdapterStoreUnreachable",
            "exp_alerts": [
                {
                    "exp_labels": {"severity": "warning", "instance": "cut"},
                    "exp_annotations": {
                        "summary": "The adapter store has not answered cut for over 5 minutes",
                        "description": (
                            "Its calls fail (unreachable, timed out, refused credentials; the logs say "
                            "which). Loaded adapters keep serving, but this replica sees no new versions "
                            "and refuses adapters it does not hold (480 seconds since the last answer)."
                        ),
                    },
                }
            ],
        },
    ]
    promtool_test(tmp_path, input_series, checks)


def test_a_replica_up_but_not_serving_pages_and_a_slow_load_does_not(tmp_path: Path) -> None:
    """The metrics port opens before the model loads (a long load was "down" and paged LorafleetDown);
    ``lorafleet_ready`` says whether the replica serves, ``lorafleet_start_time_seconds`` since when it
    runs. A load of 8 minutes, then serving, does not page; a process not serving 10 minutes after its
    start (stuck loading, or a crashed engine) does. A replica that fails to load and restarts every 4
    minutes leaves gaps in its series (which reset a pending ``for``): it pages as restarting. One
    draining for minutes (a long shutdown grace) is not ready on purpose: no page (the second diff
    review)."""
    crash = " ".join(["0", "0", "0", "_"] + [f"{240 * k} {240 * k} {240 * k} _" for k in range(1, 8)])
    input_series = [
        {"series": 'lorafleet_ready{instance="slow"}', "values": "0x8 1x24"},
        {"series": 'lorafleet_start_time_seconds{instance="slow"}', "values": "0x32"},
        {"series": 'lorafleet_ready{instance="stuck"}', "values": "0x32"},
        {"series": 'lorafleet_start_time_seconds{instance="stuck"}', "values": "0x32"},
        {"series": 'lorafleet_ready{instance="fine"}', "values": "1x32"},
        {"series": 'lorafleet_start_time_seconds{instance="fine"}', "values": "0x32"},
        {
            "series": 'lorafleet_ready{instance="crash"}',
            "values": " ".join("_" if v == "_" else "0" for v in crash.split()),
        },
        {"series": 'lorafleet_start_time_seconds{instance="crash"}', "values": crash},
        {"series": 'up{job="lorafleet", instance="slow"}', "values": "1x32"},
        # a rolling update with a long grace: ready 20 minutes, then draining (not ready) for 5
        {"series": 'lorafleet_ready{instance="leaving"}', "values": "1x20 0x5"},
        {"series": 'lorafleet_draining{instance="leaving"}', "values": "0x20 1x5"},
        {"series": 'lorafleet_start_time_seconds{instance="leaving"}', "values": "0x25"},
    ]
    for instance in ("slow", "stuck", "fine"):
        input_series.append({"series": f'lorafleet_draining{{instance="{instance}"}}', "values": "0x32"})
    input_series.append(
        {
            "series": 'lorafleet_draining{instance="crash"}',
            "values": " ".join("_" if v == "_" else "0" for v in crash.split()),
        }
    )
    annotations = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    [rule] = [r for g in annotations["groups"] for r in g["rules"] if r.get("alert") == "LorafleetNotReady"]
    page = {
        "exp_labels": {"severity": "page", "instance": "stuck"},
        "exp_annotations": {
            "summary": "lorafleet server stuck is up but not serving",
            "description": rule["annotations"]["description"].replace("{{ $labels.instance }}", "stuck"),
        },
    }
    checks = [
        {"eval_time": "10m", "alertname": "LorafleetNotReady", "exp_alerts": []},
        {"eval_time": "13m", "alertname": "LorafleetNotReady", "exp_alerts": [page]},
        {"eval_time": "13m", "alertname": "LorafleetDown", "exp_alerts": []},
        {"eval_time": "9m", "alertname": "LorafleetRestarting", "exp_alerts": []},  # two restarts: may be deliberate
        {"eval_time": "13m", "alertname": "LorafleetRestarting", "exp_alerts": [restarting("crash", 3)]},
        {"eval_time": "24m", "alertname": "LorafleetNotReady", "exp_alerts": [page]},  # never the one draining
        {"eval_time": "30m", "alertname": "LorafleetNotReady", "exp_alerts": [page]},  # never the crash loop
    ]
    promtool_test(tmp_path, input_series, checks)


def restarting(instance: str, times: int) -> dict[str, Any]:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    [rule] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "LorafleetRestarting"]
    return {
        "exp_labels": {"severity": "page", "instance": instance},
        "exp_annotations": {
            "summary": f"lorafleet server {instance} keeps restarting",
            "description": rule["annotations"]["description"]
            .replace("{{ $labels.instance }}", instance)
            .replace("{{ $value }}", str(times)),
        },
    }


def test_dashboard_queries_name_exported_metrics(live: LiveServer) -> None:
    board = json.loads((ROOT / "deploy/grafana/lorafleet.json").read_text())
    exported = {line.split()[2] for line in scrape(live).splitlines() if line.startswith("# TYPE")}
    series = set(exported)
    for name in exported:  # histograms and counters expose suffixed series
        series |= {name + s for s in ("_bucket", "_sum", "_count", "_total", "_info")}
    used: set[str] = set()
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= set(re.findall(r"lorafleet_[a-z_]+", target["expr"]))
    assert used
    assert used <= series, f"dashboard names metrics the server does not export: {sorted(used - series)}"
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in (
        "first token",
        "per output token",
        "throughput",
        "queue",
        "batch",
        "hit ratio",
        "evictions",
        "errors",
    ):
        assert topic in titles


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prometheus(live: LiveServer, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: lorafleet\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{live.metrics_port}']\n"
    )
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"prometheus exited with {proc.returncode} (its port {port} taken?)"
            try:
                urllib.request.urlopen(url + "/-/ready", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        else:
            raise AssertionError("prometheus did not become ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _query(url: str, promql: str) -> float | None:
    with urllib.request.urlopen(f"{url}/api/v1/query?query={urllib.parse.quote(promql)}", timeout=10) as resp:
        data = json.load(resp)
    result = data["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_a_real_prometheus_scrapes_ttft_and_requests(live: LiveServer, prometheus: str) -> None:
    def wait_for(promql: str, want: float, timeout: float = 30) -> None:
        """Until Prometheus reports exactly ``want`` (a scrape may lag; it must not overshoot)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = _query(prometheus, promql)
            if last == want:
                return
            time.sleep(0.5)
        raise AssertionError(f"{promql} stayed at {last}, wanted {want}")

    # The shared server has served earlier tests: the baselines are what it exports now, read straight
    # from its endpoint, and Prometheus must report exactly these plus what this test does.
    before = scrape(live)
    ok = sample(before, "lorafleet_requests_total", rpc="GenerateStream", code="OK")
    not_found = sample(before, "lorafleet_requests_total", rpc="Generate", code="NOT_FOUND")
    ttft = sample(before, "lorafleet_time_to_first_token_seconds_count")
    for _ in range(3):
        stream = live.client.stream(messages=[Message("user", "Hi")], sampling=Sampling(max_new_tokens=4))
        list(stream)
    with pytest.raises(LoraFleetError) as err:
        live.client.generate("Hi", adapter="acme/unknown")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    wait_for('sum(lorafleet_requests_total{rpc="GenerateStream",code="OK"})', ok + 3)
    wait_for("sum(lorafleet_time_to_first_token_seconds_count)", ttft + 3)  # the refused call never ran
    wait_for('sum(lorafleet_requests_total{rpc="Generate",code="NOT_FOUND"})', not_found + 1)
    wait_for('up{job="lorafleet"}', 1)


def test_one_structured_log_line_per_request(live: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from lorafleet_server.logs import JsonFormatter

    with caplog.at_level(logging.INFO, logger="lorafleet.requests"):
        live.client.generate("Hi", adapter="acme/support", sampling=Sampling(max_new_tokens=2), request_id="trace-42")
        with pytest.raises(LoraFleetError):
            live.client.generate("Hi", sampling=Sampling(top_p=3.0), request_id="trace-43")
        # An aborted RPC's status can reach the client before its log line is written: wait (inside
        # the block, where the logger still lets INFO through).
        deadline = time.monotonic() + 5
        records: dict[str, logging.LogRecord] = {}
        while "trace-43" not in records and time.monotonic() < deadline:
            records = {r.fields["request_id"]: r for r in caplog.records if hasattr(r, "fields")}  # type: ignore[attr-defined]
            time.sleep(0.05)
        time.sleep(0.2)  # a second line of either request, if one were written, has come by now
        ids = [r.fields["request_id"] for r in caplog.records if hasattr(r, "fields")]  # type: ignore[attr-defined]
    assert ids.count("trace-42") == 1 and ids.count("trace-43") == 1, ids  # one each: a dict hid a second
    ok = json.loads(JsonFormatter().format(records["trace-42"]))
    assert ok["tenant"] == "acme" and ok["adapter"] == "acme/support@1" and ok["status"] == "OK"
    assert ok["generated_tokens"] == 2 and ok["prompt_tokens"] > 0 and ok["ttft_s"] is not None
    assert ok["duration_s"] >= ok["ttft_s"]
    bad = json.loads(JsonFormatter().format(records["trace-43"]))
    assert bad["status"] == "INVALID_ARGUMENT" and "top_p" in bad["error"]
