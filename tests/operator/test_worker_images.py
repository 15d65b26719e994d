"""The default worker image: the operator's, per device, unless the spec names one."""

from __future__ import annotations

from moe_operator.api import MoEDeploymentSpec
from moe_operator.images import WorkerImages, with_worker_image
from moe_operator.manifests import children
from moe_operator.manifests.router import DEFAULT_ROUTER_IMAGE

IMAGES = WorkerImages(cpu="registry.example/worker:1", cuda="registry.example/worker:1-cuda")


def _image(spec: MoEDeploymentSpec) -> str:
    statefulset = children.build_statefulset("m", "ns", spec)
    return statefulset["spec"]["template"]["spec"]["containers"][0]["image"]


def test_an_empty_image_means_the_default_for_the_device() -> None:
    cuda = MoEDeploymentSpec()
    cpu = MoEDeploymentSpec.model_validate({"worker": {"device": "cpu", "backend": "gloo"}})
    assert cuda.worker.image == ""
    assert _image(with_worker_image(cuda, IMAGES)) == IMAGES.cuda
    assert _image(with_worker_image(cpu, IMAGES)) == IMAGES.cpu


def test_an_image_in_the_spec_wins() -> None:
    spec = MoEDeploymentSpec.model_validate({"worker": {"image": "mine/worker:7"}})
    assert with_worker_image(spec, IMAGES) is spec


def test_the_chart_sets_both_images() -> None:
    images = WorkerImages.from_environ(
        {"MOE_WORKER_IMAGE": "r/w:2", "MOE_WORKER_IMAGE_CUDA": "r/w:2-gpu"}
    )
    assert images == WorkerImages(cpu="r/w:2", cuda="r/w:2-gpu", router=DEFAULT_ROUTER_IMAGE)


def test_the_cuda_image_follows_the_cpu_one_when_only_that_is_set() -> None:
    assert WorkerImages.from_environ({"MOE_WORKER_IMAGE": "r/w:2"}).cuda == "r/w:2-cuda"
