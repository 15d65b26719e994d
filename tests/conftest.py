"""Shared fixtures: one real local control plane per test session (about 10 s to start)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """kube-apiserver, controller-manager, scheduler and etcd v1.20.2 on 127.0.0.1.

    The CRDs are applied before the controllers start, so the garbage collector knows them and
    owner-reference cascades of MoEDeployments work from the first second.
    """
    from moe_local.cluster import apply_crds
    from moe_local.controlplane import ControlPlane, ControlPlaneConfig, ensure_binaries

    bin_dir = ensure_binaries()
    plane = ControlPlane(
        ControlPlaneConfig(workdir=tmp_path_factory.mktemp("plane"), bin_dir=bin_dir)
    )

    plane.start(before_controllers=apply_crds)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kube_admin_kubeconfig(control_plane: object) -> str:
    return str(control_plane.kubeconfig)  # type: ignore[attr-defined]
