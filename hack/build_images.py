#!/usr/bin/env python3
"""Build moe-ep's container images with buildah on this machine, pulling from no registry.

    python3 hack/build_images.py                  # operator and CPU worker (`make images`)
    python3 hack/build_images.py worker-cuda      # the CUDA worker (`make images-cuda`; GBs)
    python3 hack/build_images.py --names          # print the image names and exit

1. A Debian bookworm minbase rootfs with python3, venv and CA certificates, made by mmdebstrap
   from Debian's packages and cached as a tarball in ~/.cache/moe-ep/images/ (once per machine).
2. Imported into buildah's storage as a local base image (`buildah from scratch`, `add`, `commit`).
3. images/Containerfile.* built on it by `buildah build --build-arg BASE=<that image>
   --pull=never`: the very files a docker or podman user builds, so the two ways cannot drift.

Storage driver vfs and chroot isolation: both work as root inside a container, where overlay
mounts and new namespaces may not. Needs root, buildah and mmdebstrap
(hack/install-system-deps.sh installs them). Standard library only.

Names come from the chart, nowhere else: repositories from values.yaml (`image.repository`,
`workerImage.repository`), the tag from Chart.yaml's appVersion; the CUDA worker's tag is
`<appVersion>-cuda`, as the chart tells the operator.

pip inside the build uses this machine's pip settings (find-links, extra indexes, e.g. the local
CPU torch wheel): local directories are served to the build on 127.0.0.1 (chroot isolation shares
the host's network) rather than bind-mounted, because buildah leaves bind mount points behind in
the image.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "moe-ep"
IMAGES_DIR = ROOT / "images"
CACHE = Path(os.environ.get("MOE_EP_CACHE", Path.home() / ".cache" / "moe-ep")) / "images"
CUDA_TAG_SUFFIX = "-cuda"

SUITE = "bookworm"
ROOTFS_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Documentation, man pages and translations are most of a minbase's bulk and no use in an image.
MMDEBSTRAP_OPTIONS = (
    "--variant=minbase",
    "--include=" + ",".join(ROOTFS_PACKAGES),
    "--aptopt=APT::Install-Recommends false",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
)
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(message: str) -> None:
    print(f"[build-images] {message}", file=sys.stderr, flush=True)


# --- names ---------------------------------------------------------------------------------------


def _yaml_scalar(text: str, path: Sequence[str]) -> str:
    """The scalar at `path` in a block-style YAML file laid out like the chart's (two-space
    indents, `key: value` lines). Standard library only, so the build needs no venv;
    tests/images/test_names.py checks it against PyYAML on the real files."""
    depth = 0
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent < 2 * depth:
            raise KeyError(".".join(path))  # left the block before finding the key
        match = re.fullmatch(r"(\S+):\s*(.*?)\s*(?:#.*)?", line.strip())
        if indent != 2 * depth or match is None or match.group(1) != path[depth]:
            continue
        if depth == len(path) - 1:
            value = match.group(2)
            return ast.literal_eval(value) if value[:1] in "'\"" else value
        depth += 1
    raise KeyError(".".join(path))


def app_version(chart: Path = CHART) -> str:
    return _yaml_scalar((chart / "Chart.yaml").read_text(), ["appVersion"])


def image_names(chart: Path = CHART) -> dict[str, str]:
    """{"operator" | "worker" | "worker-cuda": full image name}, from the chart alone, the way
    its templates compose them (a tag left empty is the appVersion)."""
    values = (chart / "values.yaml").read_text()

    def name(key: str) -> str:
        tag = _yaml_scalar(values, [key, "tag"]) or app_version(chart)
        return f"{_yaml_scalar(values, [key, 'repository'])}:{tag}"

    worker = name("workerImage")
    return {"operator": name("image"), "worker": worker, "worker-cuda": worker + CUDA_TAG_SUFFIX}


def containerfile_default(containerfile: Path, arg: str) -> str:
    """The default of `ARG <arg>=...` in a Containerfile."""
    match = re.search(rf"^ARG {arg}=(\S*)$", containerfile.read_text(), re.MULTILINE)
    if match is None:
        raise KeyError(f"{containerfile.name} declares no default for ARG {arg}")
    return match.group(1)


@dataclass(frozen=True)
class Target:
    """One image: which Containerfile and which build arguments."""

    name: str
    containerfile: str
    build_args: dict[str, str] = field(default_factory=dict)
    local_torch: bool = True  # may take torch from this machine's find-links


TARGETS = {
    "operator": Target("operator", "Containerfile.operator"),
    "worker": Target("worker", "Containerfile.worker", {"TORCH_VARIANT": "cpu"}),
    # PyPI's CUDA torch: this machine's find-links may hold a CPU torch pip would prefer.
    "worker-cuda": Target(
        "worker-cuda", "Containerfile.worker", {"TORCH_VARIANT": "cuda"}, local_torch=False
    ),
}
DEFAULT_TARGETS = ("operator", "worker")


# --- buildah -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Buildah:
    """buildah with vfs storage, optionally in a private storage root (tests use one)."""

    root: Path | None = None
    runroot: Path | None = None

    def argv(self, *args: str) -> list[str]:
        storage = ["--storage-driver", "vfs"]
        if self.root is not None:
            storage += ["--root", str(self.root)]
        if self.runroot is not None:
            storage += ["--runroot", str(self.runroot)]
        return ["buildah", *storage, *args]

    def run(self, *args: str, capture: bool = False) -> str:
        result = subprocess.run(
            self.argv(*args), check=True, text=True, stdout=subprocess.PIPE if capture else None
        )
        return (result.stdout or "").strip()

    def inspect(self, name: str) -> dict[str, Any] | None:
        """`buildah inspect` of an image, or None when there is no image of that name."""
        result = subprocess.run(
            self.argv("inspect", "--type", "image", name), text=True, capture_output=True
        )
        return json.loads(result.stdout) if result.returncode == 0 else None

    def image_id(self, name: str) -> str | None:
        info = self.inspect(name)
        return info["FromImageID"] if info else None

    def size_bytes(self, name: str) -> int:
        """Uncompressed: the sum of the image's layers as stored."""
        info = self.inspect(name)
        assert info is not None, name
        return sum(layer["size"] for layer in json.loads(info["Manifest"])["layers"])


# --- the base: a Debian rootfs -------------------------------------------------------------------


def rootfs_key() -> str:
    """Names the cached rootfs by everything that shapes it, so a change builds a new one."""
    spec = json.dumps([SUITE, MMDEBSTRAP_OPTIONS])
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def ensure_rootfs(cache: Path = CACHE) -> Path:
    tarball = cache / f"rootfs-{SUITE}-{rootfs_key()}.tar"
    if tarball.exists():
        log(f"rootfs: {tarball} (cached)")
        return tarball
    cache.mkdir(parents=True, exist_ok=True)
    # Written under a name of its own, renamed when complete: an interrupted or concurrent
    # build never leaves a half tarball under the cache name.
    partial = tarball.with_name(f"{tarball.stem}.{os.getpid()}.partial.tar")
    log(f"rootfs: mmdebstrap {SUITE} {' '.join(ROOTFS_PACKAGES)} (about a minute, once)")
    started = time.monotonic()
    try:
        subprocess.run(
            ["mmdebstrap", "--quiet", *MMDEBSTRAP_OPTIONS, SUITE, str(partial)], check=True
        )
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.rename(tarball)
    log(f"rootfs: {tarball.stat().st_size / 1e6:.0f} MB in {time.monotonic() - started:.0f} s")
    return tarball


def ensure_base(buildah: Buildah, tarball: Path) -> str:
    """The rootfs as a local image, `localhost/moe-ep-base:bookworm-<key>`."""
    name = f"localhost/moe-ep-base:{SUITE}-{rootfs_key()}"
    if buildah.image_id(name):
        return name
    container = buildah.run("from", "scratch", capture=True)
    try:
        buildah.run("add", "--quiet", container, str(tarball), "/")
        buildah.run("config", "--env", f"PATH={BASE_PATH}", "--cmd", "/bin/sh", container)
        buildah.run("commit", "--quiet", "--rm", container, name, capture=True)
    except BaseException:
        subprocess.run(buildah.argv("rm", container), capture_output=True)
        raise
    log(f"base: imported {tarball.name} as {name}")
    return name


# --- pip's sources, served to the build ----------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """http://127.0.0.1:<port>/ serving `directory` read-only until the block ends."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


PIP_OPTIONS = ("index-url", "extra-index-url", "find-links", "cert")
# In the rootfs (package ca-certificates): a bundle mounted over it leaves nothing behind.
IMAGE_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def host_pip_settings() -> dict[str, list[str]]:
    """{option: values} for PIP_OPTIONS from `pip config list`, which merges pip's config files
    and PIP_* variables the way pip itself does."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    )
    settings: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        key, _, raw = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        if option in PIP_OPTIONS and raw:
            # Environment variables come last in pip's precedence; later keys win here too.
            settings[option] = str(ast.literal_eval(raw)).split()
    return settings


def _local_path(location: str) -> Path | None:
    if location.startswith("file://"):
        return Path(urlparse(location).path)
    return Path(location) if "://" not in location else None


@dataclass(frozen=True)
class PipSources:
    """What the build needs to see this machine's pip settings: PIP_* build arguments (the
    Containerfiles declare them) and bind mounts."""

    build_args: dict[str, str]
    volumes: tuple[str, ...] = ()


@contextlib.contextmanager
def pip_sources(settings: dict[str, list[str]]) -> Iterator[PipSources]:
    """`settings` made reachable from inside the build: local directories served over HTTP
    while the block runs, a CA bundle (a proxy's, say) mounted over the image's own."""
    with contextlib.ExitStack() as stack:
        args: dict[str, str] = {}
        volumes: list[str] = []
        for option, values in settings.items():
            urls = []
            for value in values:
                path = _local_path(value)
                if path is None:
                    urls.append(value)
                elif not path.exists():
                    continue
                elif option == "cert":
                    volumes.append(f"{path}:{IMAGE_CA_BUNDLE}:ro")
                    urls.append(IMAGE_CA_BUNDLE)
                elif option == "find-links":
                    urls.append(stack.enter_context(serve_directory(path)))
                else:
                    # An index's pages link to files beside it (`../../files/x.whl`): serve
                    # the index's parent so those links resolve.
                    base = stack.enter_context(serve_directory(path.parent))
                    urls.append(f"{base}{path.name}/")
            if urls:
                args["PIP_" + option.upper().replace("-", "_")] = " ".join(urls)
        yield PipSources(args, tuple(volumes))


def has_local_torch(settings: dict[str, list[str]], version: str) -> bool:
    """Whether a find-links directory holds torch's CPU build of `version`."""
    for location in settings.get("find-links", []):
        path = _local_path(location)
        if path is not None and path.is_dir() and any(path.glob(f"torch-{version}+cpu-*.whl")):
            return True
    return False


# --- building ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    target: str
    name: str
    seconds: float
    size_bytes: int


def build(
    buildah: Buildah,
    target: Target,
    base: str,
    name: str,
    build_args: dict[str, str],
    volumes: Sequence[str] = (),
) -> Built:
    previous = buildah.image_id(name)
    args = {"BASE": base, "VERSION": app_version(), **target.build_args, **build_args}
    argv = ["build", "--isolation", "chroot", "--pull=never", "--layers=false"]
    argv += ["--file", str(IMAGES_DIR / target.containerfile), "--tag", name]
    for key, value in args.items():
        argv += ["--build-arg", f"{key}={value}"]
    for volume in volumes:
        argv += ["--volume", volume]
    log(f"{target.name}: buildah {shlex.join(argv)} .")
    started = time.monotonic()
    buildah.run(*argv, str(ROOT))
    seconds = time.monotonic() - started
    current = buildah.image_id(name)
    if previous and previous != current:
        # The name moved to the new image; vfs keeps whole copies, so drop the old one.
        subprocess.run(buildah.argv("rmi", previous), capture_output=True)
    built = Built(target.name, name, seconds, buildah.size_bytes(name))
    log(f"{target.name}: {name}, {built.size_bytes / 1e6:.0f} MB, {seconds:.0f} s")
    return built


def check_tools() -> None:
    missing = [tool for tool in ("buildah", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        sys.exit(
            f"build-images: {' and '.join(missing)} not found; run hack/install-system-deps.sh"
        )
    if os.geteuid() != 0:
        sys.exit("build-images: needs root (mmdebstrap and buildah's chroot isolation)")


def build_images(
    targets: Sequence[str],
    *,
    buildah: Buildah,
    torch_version: str | None = None,
    cache: Path = CACHE,
) -> list[Built]:
    check_tools()
    names = image_names()
    torch_version = torch_version or containerfile_default(
        IMAGES_DIR / "Containerfile.worker", "TORCH_VERSION"
    )
    base = ensure_base(buildah, ensure_rootfs(cache))
    settings = host_pip_settings()
    built = []
    for target_name in targets:
        target = TARGETS[target_name]
        extra: dict[str, str] = {}
        target_settings = dict(settings)
        if "TORCH_VARIANT" in target.build_args:
            extra["TORCH_VERSION"] = torch_version
            if not target.local_torch:
                target_settings.pop("find-links", None)
            elif has_local_torch(settings, torch_version):
                extra["TORCH_CPU_INDEX"] = ""  # the local find-links directory has it
        with pip_sources(target_settings) as pip:
            extra |= pip.build_args
            built.append(build(buildah, target, base, names[target_name], extra, pip.volumes))
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "targets", nargs="*", metavar="TARGET",
        help=f"{' | '.join(TARGETS)} (default: {' '.join(DEFAULT_TARGETS)})",
    )  # fmt: skip
    parser.add_argument("--names", action="store_true", help="print image names and exit")
    parser.add_argument("--torch-version", help="torch to install in workers (the Makefile pin)")
    parser.add_argument("--root", type=Path, help="buildah storage root (default: buildah's)")
    parser.add_argument("--runroot", type=Path, help="buildah run root (default: buildah's)")
    args = parser.parse_args(argv)
    if args.names:
        for target, name in image_names().items():
            print(f"{target} {name}")
        return 0
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown image {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    buildah = Buildah(args.root, args.runroot)
    started = time.monotonic()
    built = build_images(
        args.targets or DEFAULT_TARGETS, buildah=buildah, torch_version=args.torch_version
    )
    for image in built:
        print(f"{image.name}  {image.size_bytes / 1e6:.0f} MB  built in {image.seconds:.0f} s")
    log(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
