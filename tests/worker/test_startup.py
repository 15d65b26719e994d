"""Starting a worker: a checkpoint that disagrees with the declared shape stops it with both values
named (stderr and the termination message); in a pod, flags may not override what the operator
sets; a mounted plan that does not fit falls back to round-robin; `open_weights` completes the
shape from config.json."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moe_contract.plan import round_robin_plan
from moe_contract.shape import ModelShape
from moe_worker.main import FlagRefused, build_parser, check_pod_flags, serve_settings
from moe_worker.models.checkpoint import write_checkpoint
from moe_worker.models.weights import SyntheticWeights
from moe_worker.runtime.initial_plan import read_initial_plan
from moe_worker.runtime.loading import ShapeMismatch, model_card, open_weights
from moe_worker.settings import WorkerSettings, settings_from_env

SHAPE = ModelShape(
    layers=2, experts=4, hidden=32, ffn_hidden=48, heads=4, head_dim=8, vocab_size=80
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(
        tmp_path_factory.mktemp("tiny-seed"), SyntheticWeights.for_shape(SHAPE, seed=3)
    )


def clean_env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    return {**base, "OMP_NUM_THREADS": "1", **extra}


def test_a_checkpoint_that_disagrees_with_the_deployment_stops_the_worker(
    checkpoint: Path, tmp_path: Path
) -> None:
    termination = tmp_path / "termination-log"
    termination.touch()  # Kubernetes mounts the file; the worker only writes into an existing one
    env = clean_env(
        MOE_POD_NAME="llm-0",
        MOE_CHECKPOINT=str(checkpoint),
        MOE_LAYERS="3",
        MOE_EXPERTS_PER_LAYER="4",
        MOE_HIDDEN_SIZE="64",
        MOE_TERMINATION_MESSAGE_PATH=str(termination),
    )
    done = subprocess.run(
        [sys.executable, "-m", "moe_worker.main", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    for text in (done.stderr, termination.read_text()):
        assert "layers: the MoEDeployment says 3" in text and "config.json says 2" in text
        assert "hidden: the MoEDeployment says 64" in text and "says 32" in text
        assert "experts:" not in text  # declared and equal: not a problem


def test_in_a_pod_flags_may_not_override_the_operator(tmp_path: Path) -> None:
    parser = build_parser()
    pod = {"MOE_POD_NAME": "llm-0", "MOE_TOKEN_PATH": "/etc/moe-ep/control/token"}
    for argv, flag in (
        (["serve", "--token-file", "/etc/hostname"], "--token-file"),
        (["serve", "--layers", "8"], "--layers"),
        (["serve", "--world", "2"], "--world-size"),
        (["serve", "--checkpoint", "/elsewhere"], "--checkpoint"),
        (["serve", "--rank", "1"], "--rank"),
        (["serve", "--kv-cache-tokens", "64"], "--kv-cache-tokens"),  # the operator's to set
    ):
        with pytest.raises(FlagRefused, match=f"{flag} may not override"):
            check_pod_flags(parser.parse_args(argv), pod)
    # USER_FLAGS stay free (the demo's extraArgs), and outside pods everything is.
    allowed = ["serve", "--traffic-batch", "2", "--zipf", "1.5", "--seed", "3"]
    check_pod_flags(parser.parse_args(allowed), pod)
    check_pod_flags(parser.parse_args(["serve", "--token-file", "/t", "--layers", "3"]), {})
    # A flag for a variable the environment sets is refused in a pod, whoever set it.
    with pytest.raises(FlagRefused, match="MOE_TRAFFIC_ZIPF"):
        check_pod_flags(
            parser.parse_args(["serve", "--zipf", "1"]), {**pod, "MOE_TRAFFIC_ZIPF": "1.5"}
        )
    termination = tmp_path / "termination-log"
    termination.touch()
    done = subprocess.run(
        [sys.executable, "-m", "moe_worker.main", "serve", "--token-file", "/etc/hostname"],
        env=clean_env(**pod, MOE_TERMINATION_MESSAGE_PATH=str(termination)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--token-file may not override MOE_TOKEN_PATH" in done.stderr
    assert "--token-file" in termination.read_text()


def test_flags_override_the_environment_outside_pods() -> None:
    args = build_parser().parse_args(["serve", "--world", "4", "--layers", "3", "--zipf", "1.2"])
    s = serve_settings(args, {"MOE_WORLD_SIZE": "2", "MOE_EXPERTS_PER_LAYER": "8"})
    assert (s.world_size, s.model.layers, s.model.experts, s.traffic.zipf) == (4, 3, 8, 1.2)
    assert s.declared_shape == {"layers", "experts"}


def test_open_weights_completes_the_shape_from_config_json(checkpoint: Path) -> None:
    source, settings = open_weights(WorkerSettings(checkpoint=str(checkpoint)))
    assert settings.model == SHAPE
    assert model_card(source, settings).name == checkpoint.name
    declared = settings_from_env({"MOE_CHECKPOINT": str(checkpoint), "MOE_LAYERS": "2"})
    assert open_weights(declared)[1].model == SHAPE
    with pytest.raises(ShapeMismatch, match="experts: the MoEDeployment says 8"):
        open_weights(
            settings_from_env({"MOE_CHECKPOINT": str(checkpoint), "MOE_EXPERTS_PER_LAYER": "8"})
        )
    synthetic, plain = open_weights(WorkerSettings(model=SHAPE))
    assert model_card(synthetic, plain).name == "seedmlp-synthetic"


def test_a_mounted_plan_that_does_not_fit_falls_back_to_round_robin(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = WorkerSettings(model=SHAPE, world_size=2, plan_path=str(tmp_path))
    (tmp_path / "plan.json").write_text(round_robin_plan(3, 4, 2, 2, version=7).to_json())
    with caplog.at_level(logging.WARNING):
        plan = read_initial_plan(settings)
    assert plan == round_robin_plan(2, 4, 2, 2)
    assert "does not fit" in caplog.text and "slots: has 3 layers" in caplog.text
    (tmp_path / "plan.json").write_text(round_robin_plan(2, 4, 2, 3, version=7).to_json())
    assert read_initial_plan(settings).version == 7


def test_a_port_in_use_stops_the_rank_in_one_line(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moe_worker.process import EXIT_CONFIG, serve

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        settings = WorkerSettings(
            checkpoint=str(checkpoint), http_port=port, bind_address="127.0.0.1", api_port=0
        )
        assert serve(settings) == EXIT_CONFIG
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"moe-worker: rank 0: the control server cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    ]
