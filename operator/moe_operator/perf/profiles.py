"""Hardware profiles from YAML files: the performance model's only file I/O (its edge).

Bundled profiles live in `moe_operator/perf/profiles/`; any path works too. File format: under
`hardware:` and `network:` each figure is `{value: <number>, source: "<datasheet / measured by ...
on DATE / assumed: why>"}` (a bare number is accepted; its source is then "unspecified").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml

from moe_operator.perf.types import HardwareProfile, NetworkProfile, Profile

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


def _figure(raw: Any) -> tuple[float, str]:
    if isinstance(raw, Mapping):
        return float(raw["value"]), str(raw.get("source", "unspecified"))
    return float(raw), "unspecified"


def profile_from_dict(doc: Mapping[str, Any]) -> Profile:
    """Build a Profile from a parsed profile document (see the module docstring)."""
    sources: dict[str, str] = {}
    parts: dict[str, dict[str, float]] = {}
    for section, cls in (("hardware", HardwareProfile), ("network", NetworkProfile)):
        known = {f.name for f in fields(cls)} - {"name"}
        given = doc.get(section) or {}
        unknown = set(given) - set(known)
        if unknown:
            raise ValueError(f"profile {section}: unknown figures {sorted(unknown)}")
        parts[section] = {}
        for key, raw in given.items():
            value, src = _figure(raw)
            parts[section][key] = int(value) if key == "gpus_per_node" else value
            sources[key] = src
    name = str(doc.get("name", "unnamed"))
    return Profile(
        name=name,
        hardware=HardwareProfile(name=name, **parts["hardware"]),
        network=NetworkProfile(**parts["network"]),
        sources=tuple(sorted(sources.items())),
    )


def load_profile(name_or_path: str) -> Profile:
    """A bundled profile by name (`h100-sxm`, `h200`, `cpu-local`) or a YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no profile {name_or_path!r}; bundled: {', '.join(names)}")
    return profile_from_dict(yaml.safe_load(path.read_text()))


def profile_to_yaml(profile: Profile) -> str:
    """The profile in the file format, sources included (for saving a calibrated profile)."""
    hw = {k: v for k, v in asdict(profile.hardware).items() if k != "name"}
    doc = {
        "name": profile.name,
        "hardware": {k: {"value": v, "source": profile.source(k)} for k, v in hw.items()},
        "network": {
            k: {"value": v, "source": profile.source(k)} for k, v in asdict(profile.network).items()
        },
    }
    return yaml.safe_dump(doc, sort_keys=False, width=120)
