"""The moe-ep alerts: promtool checks and unit tests (rules_test.yaml), and one rule set everywhere.

Needs Debian's `prometheus` package (promtool). Skipped without it locally; under CI (env CI set) a
missing promtool fails instead.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.requirements import require_tool

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "manifests" / "prometheus"
RULES = PROM_DIR / "rules.yaml"
CHART_RULES = ROOT / "charts" / "moe-ep" / "files" / "prometheus-rules.yaml"
UNIT_TESTS = sorted(Path(__file__).parent.glob("*_test.yaml"))
ALERTS = {"MoEExpertLoadImbalance", "MoEWorkersNotReady", "MoERebalanceStuck"}
RECORDED = {
    "moe:rank_layer_tokens:rate5m",
    "moe:layer_imbalance:ratio5m",
    "moe:layer_tokens:rate5m",
    "moe:expert_tokens:rate5m",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool")


def run(promtool: str, *args: str | Path) -> str:
    result = subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alerting_rules() -> dict[str, dict[str, Any]]:
    rules = (rule for group in load(RULES)["groups"] for rule in group["rules"])
    return {rule["alert"]: rule for rule in rules if "alert" in rule}


def recording_rules() -> dict[str, dict[str, Any]]:
    rules = (rule for group in load(RULES)["groups"] for rule in group["rules"])
    return {rule["record"]: rule for rule in rules if "record" in rule}


def test_check_rules(promtool: str) -> None:
    assert "SUCCESS: 7 rules found" in run(promtool, "check", "rules", RULES)


def test_rule_unit_tests(promtool: str) -> None:
    assert UNIT_TESTS, "no *_test.yaml next to this file"
    output = run(promtool, "test", "rules", *UNIT_TESTS)
    assert "FAILED" not in output


def test_example_config(promtool: str) -> None:
    run(promtool, "check", "config", PROM_DIR / "prometheus-example.yml")


def test_prometheusrule_carries_the_same_rules() -> None:
    prometheus_rule = load(PROM_DIR / "prometheusrule.yaml")
    assert prometheus_rule["kind"] == "PrometheusRule"
    assert prometheus_rule["spec"] == load(RULES) == load(CHART_RULES)


def test_alert_contract() -> None:
    """Names, severity, durations and the labels that identify a MoEDeployment."""
    rules = alerting_rules()
    assert set(rules) == ALERTS
    assert {name: rule["for"] for name, rule in rules.items()} == {
        "MoEExpertLoadImbalance": "5m",
        "MoEWorkersNotReady": "10m",
        "MoERebalanceStuck": "10m",
    }
    for rule in rules.values():
        assert rule["labels"] == {"severity": "warning"}
        assert {"summary", "description"} <= set(rule["annotations"])
        assert "on (namespace, moedeployment)" in rule["expr"]
    assert "moe_imbalance_threshold" in rules["MoEExpertLoadImbalance"]["expr"]


def test_recording_rules_keep_the_deployment_labels_and_drop_the_scrape_ones() -> None:
    rules = recording_rules()
    assert set(rules) == RECORDED
    for name, rule in rules.items():
        assert "by (namespace, moedeployment" in rule["expr"], name
        assert "pod" not in rule["expr"] and "instance" not in rule["expr"], name


def test_per_layer_mode_drops_the_per_expert_series_at_scrape() -> None:
    """The plain Prometheus example and the chart's PodMonitor drop the same series."""
    example = load(PROM_DIR / "prometheus-example.yml")
    (workers,) = [job for job in example["scrape_configs"] if job["job_name"] == "moe-ep-workers"]
    drop = {
        "source_labels": ["expert_series", "__name__"],
        "regex": "PerLayer;moe_expert_tokens_total",
        "action": "drop",
    }
    assert drop in workers["metric_relabel_configs"]
    monitor = load(PROM_DIR / "podmonitor-workers.yaml")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert {
        "sourceLabels": ["expert_series", "__name__"],
        "regex": "PerLayer;moe_expert_tokens_total",
        "action": "drop",
    } in endpoint["metricRelabelings"]
    assert {
        "sourceLabels": ["__meta_kubernetes_pod_label_moe_ep_io_expert_series"],
        "targetLabel": "expert_series",
    } in endpoint["relabelings"]
