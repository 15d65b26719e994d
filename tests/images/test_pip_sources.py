"""This machine's pip settings as the image build sees them (hack/build_images.py): local
directories served on 127.0.0.1 for as long as the build runs, remote URLs passed through, a CA
bundle mounted over the image's own. No tools needed."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from types import ModuleType


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_local_sources_are_served_and_remote_ones_passed_through(
    build_images: ModuleType, tmp_path: Path
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl").write_text("wheel")
    index = tmp_path / "pypi" / "simple" / "kopf"
    index.mkdir(parents=True)
    (index / "index.html").write_text('<a href="../../files/kopf.whl">kopf.whl</a>')
    (tmp_path / "pypi" / "files").mkdir()
    (tmp_path / "pypi" / "files" / "kopf.whl").write_text("kopf")
    cert = tmp_path / "ca.pem"
    cert.write_text("cert")
    settings = {
        "find-links": [str(wheels), str(tmp_path / "missing")],
        "extra-index-url": [f"file://{tmp_path}/pypi/simple", "https://mirror.example/simple"],
        "cert": [str(cert)],
    }
    with build_images.pip_sources(settings) as pip:
        args = pip.build_args
        assert args["PIP_FIND_LINKS"].startswith("http://127.0.0.1:")
        assert "torch-2.13.0%2Bcpu" in fetch(args["PIP_FIND_LINKS"])
        local_index, remote_index = args["PIP_EXTRA_INDEX_URL"].split()
        assert remote_index == "https://mirror.example/simple"
        page = fetch(local_index + "kopf/")
        assert "../../files/kopf.whl" in page
        assert fetch(local_index + "kopf/../../files/kopf.whl") == "kopf"
        assert args["PIP_CERT"] == build_images.IMAGE_CA_BUNDLE
        assert pip.volumes == (f"{cert}:{build_images.IMAGE_CA_BUNDLE}:ro",)
    assert build_images.has_local_torch(settings, "2.13.0")
    assert not build_images.has_local_torch(settings, "2.12.0")


def test_no_settings_no_arguments(build_images: ModuleType) -> None:
    with build_images.pip_sources({}) as pip:
        assert pip.build_args == {} and pip.volumes == ()
