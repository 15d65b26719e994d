"""One source for image names, user and torch: the Containerfiles, the build script, the chart,
the operator's default worker image and the Makefile agree. No tools needed."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from moe_operator.api import MoEDeploymentSpec
from moe_operator.images import WorkerImages
from moe_operator.manifests import children
from moe_operator.manifests.router import DEFAULT_ROUTER_IMAGE

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "moe-ep"
IMAGES = ROOT / "images"
ENTRYPOINTS = {"Containerfile.operator": "moe-operator", "Containerfile.worker": "moe-worker"}


def instructions(containerfile: Path, keyword: str) -> list[str]:
    """Arguments of every `keyword` instruction (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", containerfile.read_text())
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith(f"{keyword} ")]


def operator_deployment() -> dict[str, Any]:
    docs = yaml.safe_load_all((ROOT / "manifests" / "operator.yaml").read_text())
    return next(doc for doc in docs if doc and doc["kind"] == "Deployment")


@pytest.mark.parametrize(
    ("path", "keys"),
    [
        ("Chart.yaml", ["appVersion"]),
        ("values.yaml", ["image", "repository"]),
        ("values.yaml", ["workerImage", "repository"]),
        ("values.yaml", ["workerImage", "tag"]),
        ("values.yaml", ["podSecurityContext", "runAsUser"]),
    ],
)
def test_the_scripts_yaml_reader_agrees_with_pyyaml(
    build_images: ModuleType, path: str, keys: list[str]
) -> None:
    text = (CHART / path).read_text()
    want: Any = yaml.safe_load(text)
    for key in keys:
        want = want[key]
    assert build_images._yaml_scalar(text, keys) == str(want)


def test_the_scripts_yaml_reader_refuses_a_missing_key(build_images: ModuleType) -> None:
    with pytest.raises(KeyError):
        build_images._yaml_scalar("image:\n  tag: x\nrepository: y\n", ["image", "repository"])


def test_names_come_from_the_chart(build_images: ModuleType) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    version = chart["appVersion"]
    assert build_images.image_names() == {
        "operator": f"{values['image']['repository']}:{version}",
        "worker": f"{values['workerImage']['repository']}:{version}",
        "worker-cuda": f"{values['workerImage']['repository']}:{version}-cuda",
    }


def test_names_follow_tags_set_in_the_values(build_images: ModuleType, tmp_path: Path) -> None:
    values = (CHART / "values.yaml").read_text()
    (tmp_path / "Chart.yaml").write_text((CHART / "Chart.yaml").read_text())
    (tmp_path / "values.yaml").write_text(values.replace('tag: ""', 'tag: "dev"'))
    names = build_images.image_names(tmp_path)
    assert names["operator"].endswith(":dev") and names["worker-cuda"].endswith(":dev-cuda")


def test_the_chart_runs_the_images_make_images_builds(build_images: ModuleType) -> None:
    names = build_images.image_names()
    container = operator_deployment()["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}  # POD_IP: valueFrom
    assert container["image"] == names["operator"]
    assert env["MOE_WORKER_IMAGE"] == names["worker"]
    assert env["MOE_WORKER_IMAGE_CUDA"] == names["worker-cuda"]


def test_the_operators_own_default_is_the_charts(build_images: ModuleType) -> None:
    """Run without the chart (by hand, in tests), the operator still picks these images."""
    names = build_images.image_names()
    container = operator_deployment()["spec"]["template"]["spec"]["containers"][0]
    router = {item["name"]: item.get("value") for item in container["env"]}["MOE_ROUTER_IMAGE"]
    assert WorkerImages.from_environ({}) == WorkerImages(
        cpu=names["worker"], cuda=names["worker-cuda"], router=router
    )


def test_the_router_image_is_the_smg_release_the_local_cluster_runs() -> None:
    """The chart's router image, the operator's default and the smg wheel `make setup` installs
    (the node agent runs its `smg`) are one release."""
    pinned = re.search(r'"smg==([^"]+)"', (ROOT / "local" / "pyproject.toml").read_text())
    assert pinned is not None and DEFAULT_ROUTER_IMAGE.endswith(f":{pinned.group(1)}")
    container = operator_deployment()["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["MOE_ROUTER_IMAGE"] == DEFAULT_ROUTER_IMAGE


def test_package_version_is_the_charts_app_version(build_images: ModuleType) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "(.+)"$', pyproject, re.MULTILINE)
    assert version is not None and version.group(1) == build_images.app_version()


def test_workers_torch_is_the_makefiles_pin(build_images: ModuleType, torch_pin: str) -> None:
    containerfile = IMAGES / "Containerfile.worker"
    assert build_images.containerfile_default(containerfile, "TORCH_VERSION") == torch_pin


@pytest.mark.parametrize("name", sorted(ENTRYPOINTS))
def test_images_run_as_the_charts_non_root_user(name: str) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    uid, gid = values["podSecurityContext"]["runAsUser"], values["podSecurityContext"]["runAsGroup"]
    assert uid != 0
    # Numeric: the kubelet checks runAsNonRoot against the image's user only when it is a number.
    assert instructions(IMAGES / name, "USER") == [f"{uid}:{gid}"]
    assert f"APP_UID={uid}\n" in (IMAGES / "install.sh").read_text()


@pytest.mark.parametrize("name", sorted(ENTRYPOINTS))
def test_entrypoints_are_the_commands_pods_run(name: str) -> None:
    assert instructions(IMAGES / name, "ENTRYPOINT") == [f'["{ENTRYPOINTS[name]}"]']


def test_pods_run_the_entrypoints() -> None:
    operator = operator_deployment()["spec"]["template"]["spec"]["containers"][0]
    assert operator["command"] == [ENTRYPOINTS["Containerfile.operator"]]
    workers = children.build_statefulset("m", "ns", MoEDeploymentSpec())
    assert workers["spec"]["template"]["spec"]["containers"][0]["command"] == [
        ENTRYPOINTS["Containerfile.worker"]
    ]


@pytest.mark.parametrize("name", sorted(ENTRYPOINTS))
def test_containerfiles_declare_the_same_pip_and_base_arguments(name: str) -> None:
    """hack/build_images.py passes these to every image; each stage must declare them."""
    args = instructions(IMAGES / name, "ARG")
    for pip_arg in ("PIP_INDEX_URL=", "PIP_EXTRA_INDEX_URL=", "PIP_FIND_LINKS=", "PIP_CERT="):
        assert sum(arg.startswith(pip_arg) for arg in args) == 2, pip_arg  # both stages
    assert "BASE=debian:bookworm-slim" in args and "VERSION=dev" in args
