"""Build the operator and CPU worker images as `make images` does, then smoke-test them from
the inside: the entrypoint runs, the user is the chart's non-root one, the packages import (and
torch does not, in the operator), torch computes and gloo starts in the worker.

Needs root, buildah and mmdebstrap (hack/install-system-deps.sh installs them): skipped without
them, failed without them under CI=1. The images go to a private buildah storage in pytest's tmp
dir, removed afterwards; the Debian rootfs is cached in ~/.cache/moe-ep/images/ once per machine.
Measured on 2 shared, busy cores: 5.7 minutes with no rootfs cached, 6.6 with it cached (the
machine's load, not the cache, made that difference).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.requirements import missing, require_tool

pytestmark = pytest.mark.images

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("operator", "worker")
USER = "65532:65532"
BUILD_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Image:
    """A built image and a working container of it to run commands in."""

    target: str
    name: str
    config: dict[str, Any]
    container: str
    buildah: Any  # hack/build_images.py's Buildah, bound to the test's private storage

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        """`command` inside, as the image's configured user, with the image's environment."""
        argv = self.buildah.argv("run", "--isolation", "chroot", self.container, "--", *command)
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)

    def check(self, *command: str) -> str:
        result = self.run(*command)
        assert result.returncode == 0, f"{command} in {self.name}:\n{result.stdout}{result.stderr}"
        return result.stdout


def require_tools() -> None:
    for tool in ("buildah", "mmdebstrap"):
        require_tool(tool)
    if os.geteuid() != 0:
        missing("root (buildah and mmdebstrap build the images as root)")


def report_build(config: pytest.Config, output: str) -> None:
    """The build's sizes and times in the test log: what this test costs CI."""
    lines = [
        line
        for line in output.splitlines()
        if line.startswith("[build-images] ") and (" MB" in line or " done " in line)
    ]
    reporter = config.pluginmanager.getplugin("terminalreporter")
    capture = config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)


@pytest.fixture(scope="module")
def images(
    build_images: ModuleType,
    torch_pin: str,
    tmp_path_factory: pytest.TempPathFactory,
    request: Any,
) -> Iterator[dict[str, Image]]:
    require_tools()
    storage = tmp_path_factory.mktemp("buildah")
    buildah = build_images.Buildah(storage / "root", storage / "run")
    build_log = storage / "build.log"
    command = [sys.executable, str(ROOT / "hack" / "build_images.py"), *TARGETS]
    command += ["--root", str(buildah.root), "--runroot", str(buildah.runroot)]
    command += ["--torch-version", torch_pin]
    try:
        with build_log.open("w") as out:
            result = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S
            )
        output = build_log.read_text()
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{output[-6000:]}")
        report_build(request.config, output)
        names = build_images.image_names()
        built = {}
        for target in TARGETS:
            info = buildah.inspect(names[target])
            assert info is not None, names[target]
            container = buildah.run("from", "--quiet", names[target], capture=True)
            config = info["OCIv1"]["config"]
            built[target] = Image(target, names[target], config, container, buildah)
        yield built
    finally:
        subprocess.run(buildah.argv("rm", "--all"), capture_output=True)
        shutil.rmtree(storage, ignore_errors=True)


@pytest.fixture(params=TARGETS)
def image(request: Any, images: dict[str, Image]) -> Image:
    return images[request.param]


def test_config_user_entrypoint_and_labels(image: Image, build_images: ModuleType) -> None:
    config = image.config
    assert config["User"] == USER  # numeric, so the kubelet can verify runAsNonRoot
    assert config["Entrypoint"] == [f"moe-{image.target}"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == f"moe-ep-{image.target}"
    assert labels["org.opencontainers.image.version"] == build_images.app_version()


def test_the_entrypoint_runs(image: Image) -> None:
    assert "usage: " in image.check(*image.config["Entrypoint"], "--help")


def test_runs_as_the_non_root_user(image: Image) -> None:
    assert image.check("id", "-u").strip() + ":" + image.check("id", "-g").strip() == USER


def test_nothing_of_the_build_is_left_behind(image: Image) -> None:
    assert image.check("ls", "-A", "/tmp").split() == []
    assert image.check("ls", "-A", "/opt").split() == ["moe-ep"]
    assert image.run("ls", "/src").returncode != 0
    assert image.run("ls", "/wheels").returncode != 0


def test_the_operator_imports_and_has_no_torch(images: dict[str, Image]) -> None:
    operator = images["operator"]
    code = (
        "import importlib.util, moe_operator.handlers, moe_operator.main, moe_operator.cli; "
        "print(importlib.util.find_spec('torch'))"
    )
    assert operator.check("python", "-c", code).strip() == "None"
    crd = (ROOT / "crds" / "moedeployments.moe-ep.io.yaml").read_text()
    assert operator.check("moe-ep", "crd") == crd  # the API models work in the image


WORKER_SMOKE = """
import tempfile
import moe_worker.main, moe_worker.runtime.rank, torch, torch.distributed as dist
assert torch.version.cuda is None, torch.__version__
x = torch.ones(64, 64)
assert float((x @ x).sum()) == 64.0**3
with tempfile.TemporaryDirectory() as scratch:
    dist.init_process_group("gloo", init_method=f"file://{scratch}/store", rank=0, world_size=1)
    y = torch.ones(4)
    dist.all_reduce(y)
    dist.destroy_process_group()
print(torch.__version__)
"""


def test_the_worker_imports_and_torch_computes(images: dict[str, Image], torch_pin: str) -> None:
    version = images["worker"].check("python", "-c", WORKER_SMOKE).strip()
    assert version == f"{torch_pin}+cpu"
