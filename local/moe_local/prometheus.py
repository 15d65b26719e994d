"""The local Prometheus' configuration: the shipped example and rules, pointed at this workdir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "manifests" / "prometheus"


def write_prometheus_config(prom_dir: Path, interval: str, alert_for: str | None) -> Path:
    """The example config, pointed at this workdir's file_sd targets and a copy of the rules."""
    targets = prom_dir / "targets"
    targets.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus-example.yml").read_text())
    config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yaml").read_text())
    if alert_for:
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    rule["for"] = alert_for
    rules_path = prom_dir / "rules.yaml"
    rules_path.write_text(yaml.safe_dump(rules, sort_keys=False))
    config["rule_files"] = [str(rules_path)]
    # The agent writes one file per scraped pod: moe-ep-workers-*, moe-ep-operator-*, pods-*.
    config["scrape_configs"] = [
        _file_sd_job(job, targets, interval, honor_labels=job == "moe-ep-operator")
        for job in ("moe-ep-workers", "moe-ep-operator", "pods")
    ]
    path = prom_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _file_sd_job(job: str, targets: Path, interval: str, honor_labels: bool) -> dict[str, Any]:
    return {
        "job_name": job,
        "honor_labels": honor_labels,
        "metrics_path": "/metrics",
        "file_sd_configs": [
            {"files": [str(targets / f"{job}-*.json")], "refresh_interval": interval}
        ],
    }
