"""Shared fixtures: one real local control plane per test session (about 10 s to start)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "crds"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """kube-apiserver, controller-manager, scheduler and etcd v1.20.2 on 127.0.0.1.

    The CRDs are applied before the controllers start, so the garbage collector knows them and
    owner-reference cascades of MoEDeployments work from the first second.
    """
    from moe_operator.local.controlplane import ControlPlane, ControlPlaneConfig, ensure_binaries

    bin_dir = ensure_binaries()
    plane = ControlPlane(
        ControlPlaneConfig(workdir=tmp_path_factory.mktemp("plane"), bin_dir=bin_dir)
    )

    def apply_crds(kubeconfig: Path) -> None:
        subprocess.run(
            ["kubectl", f"--kubeconfig={kubeconfig}", "apply", "-f", str(CRD_DIR)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        subprocess.run(
            [
                "kubectl",
                f"--kubeconfig={kubeconfig}",
                "wait",
                "--for",
                "condition=Established",
                "crd/moedeployments.moe-ep.io",
                "--timeout=30s",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    plane.start(before_controllers=apply_crds)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kube_admin_kubeconfig(control_plane: object) -> str:
    return str(control_plane.kubeconfig)  # type: ignore[attr-defined]
