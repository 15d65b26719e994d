"""The worker image of a MoEDeployment that names none (`spec.worker.image` empty).

The chart decides it (values `workerImage`, tag the chart's appVersion) and hands it to the
operator as MOE_WORKER_IMAGE (the CPU build) and MOE_WORKER_IMAGE_CUDA (the CUDA build); each
worker gets the build for its `spec.worker.device`. Without those variables (the operator run by
hand, tests) the default is this package's own version of the images `make images` builds.
Upgrading the operator therefore moves such deployments to the matching worker: the plan
contract between the two is versioned together.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata

from moe_operator.api import MoEDeploymentSpec
from moe_operator.manifests.router import DEFAULT_ROUTER_IMAGE

WORKER_IMAGE_ENV = "MOE_WORKER_IMAGE"
WORKER_IMAGE_CUDA_ENV = "MOE_WORKER_IMAGE_CUDA"
ROUTER_IMAGE_ENV = "MOE_ROUTER_IMAGE"
"""The router's image for deployments whose spec.router names none (the chart's routerImage)."""
# The chart's values.yaml `workerImage.repository` (tests/images/test_names.py keeps them equal).
WORKER_REPOSITORY = "ghcr.io/moe-ep/moe-ep-worker"
CUDA_TAG_SUFFIX = "-cuda"


@dataclass(frozen=True)
class WorkerImages:
    """The default worker image for each device."""

    cpu: str
    cuda: str
    router: str = ""

    def for_device(self, device: str) -> str:
        return self.cuda if device == "cuda" else self.cpu

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> WorkerImages:
        tag = metadata.version("moe-ep")
        cpu = environ.get(WORKER_IMAGE_ENV) or f"{WORKER_REPOSITORY}:{tag}"
        cuda = environ.get(WORKER_IMAGE_CUDA_ENV) or f"{cpu}{CUDA_TAG_SUFFIX}"
        router = environ.get(ROUTER_IMAGE_ENV) or DEFAULT_ROUTER_IMAGE
        return cls(cpu=cpu, cuda=cuda, router=router)


def with_worker_image(spec: MoEDeploymentSpec, images: WorkerImages) -> MoEDeploymentSpec:
    """`spec` with `worker.image` filled in from `images` when the user left it empty."""
    if spec.worker.image:
        return spec
    worker = spec.worker.model_copy(update={"image": images.for_device(spec.worker.device)})
    return spec.model_copy(update={"worker": worker})
