"""The start-up refusal contract, both sides: a worker given the operator's own pod environment
and a checkpoint that disagrees with the spec stops with the exit code and message the operator
reads back from the pod's status (`moe_operator.failures`) and shows, naming both values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from moe_contract import env as worker_env
from moe_contract.shape import ModelShape
from moe_operator.api import MoEDeploymentSpec
from moe_operator.failures import STARTUP_EXIT_CODE, StartupFailure, startup_failure
from moe_operator.manifests import children
from moe_worker.models.checkpoint import write_checkpoint
from moe_worker.models.weights import SyntheticWeights
from moe_worker.process import EXIT_CONFIG

CHECKPOINT_SHAPE = ModelShape(
    layers=2, experts=4, hidden=32, ffn_hidden=48, heads=4, head_dim=8, vocab_size=80
)
SPEC = {  # the checkpoint's shape, but 3 layers
    "model": {
        "layers": 3,
        "expertsPerLayer": 4,
        "hiddenSize": 32,
        "ffnHiddenSize": 48,
        "attentionHeads": 4,
        "headDim": 8,
        "vocabSize": 80,
        "dtype": "float32",
        "source": {
            "type": "Checkpoint",
            "checkpoint": {"volume": {"hostPath": {"path": "/srv"}}, "path": "tiny"},
        },
    },
    "parallelism": {"expert": 2},
    "placement": {"slotsPerRank": 2},
    "worker": {"backend": "gloo", "device": "cpu", "gpusPerPod": 0},
}


def test_the_exit_codes_agree() -> None:
    assert EXIT_CONFIG == STARTUP_EXIT_CODE


def refusal_in_a_pod(spec: dict, checkpoint: Path, tmp_path: Path) -> StartupFailure | None:
    """Run `moe-worker serve` with the pod environment the operator renders for `spec`, the
    checkpoint at `checkpoint`; the operator's reading of the pod it leaves behind."""
    container = children.build_statefulset("llm", "ml", MoEDeploymentSpec.model_validate(spec))[
        "spec"
    ]["template"]["spec"]["containers"][0]
    pod_env = {item["name"]: item.get("value", "") for item in container["env"]}
    termination = tmp_path / "termination-log"
    termination.touch()  # the kubelet's file at terminationMessagePath
    assert pod_env[worker_env.CHECKPOINT] == "/models/tiny"  # where the volume is mounted
    pod_env.update(
        {
            worker_env.POD_NAME: "llm-1",
            worker_env.CHECKPOINT: str(checkpoint),
            worker_env.TERMINATION_MESSAGE_PATH: str(termination),
        }
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    done = subprocess.run(
        [sys.executable, "-m", "moe_worker.main", "serve"],
        env={**base, **pod_env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == STARTUP_EXIT_CODE, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    pod = {  # what the kubelet reports while the container waits to restart
        "metadata": {"name": "llm-1"},
        "status": {
            "containerStatuses": [
                {
                    "name": container["name"],
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {
                        "terminated": {
                            "exitCode": done.returncode,
                            "message": termination.read_text(),
                        }
                    },
                }
            ]
        },
    }
    return startup_failure([pod])


def test_a_mismatch_in_a_pod_reaches_the_operators_condition(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(
        tmp_path / "tiny", SyntheticWeights.for_shape(CHECKPOINT_SHAPE, seed=1)
    )
    failure = refusal_in_a_pod(SPEC, checkpoint, tmp_path)
    assert failure is not None and failure.reason == "CheckpointMismatch"
    text = failure.describe(2)
    assert "layers: the MoEDeployment says 3" in text and "config.json says 2" in text


def test_a_truncated_shard_in_a_pod_is_named_in_the_operators_condition(tmp_path: Path) -> None:
    """Issue 19, item 3: before, a truncated shard failed in loading (exit 1, a traceback) and
    the group was replaced forever; now the worker refuses it (exit 2) naming the file."""
    checkpoint = write_checkpoint(
        tmp_path / "tiny",
        SyntheticWeights.for_shape(CHECKPOINT_SHAPE, seed=1),
        max_shard_bytes=60_000,
    )
    shard = sorted(checkpoint.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    spec = {**SPEC, "model": {**SPEC["model"], "layers": 2}}
    failure = refusal_in_a_pod(spec, checkpoint, tmp_path)
    assert failure is not None and failure.reason == "CheckpointInvalid"
    assert f"the checkpoint is invalid: {shard}: truncated" in failure.describe(2)
