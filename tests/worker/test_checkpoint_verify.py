"""A checkpoint is checked before loading (issue 19, item 3): each kind of damage is refused
with `CheckpointInvalid` naming the file and the problem, which the worker turns into its
start-up refusal; an intact checkpoint passes, and what passes, safetensors itself opens."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors import SafetensorError, safe_open

from moe_contract.shape import ModelShape
from moe_worker.models import verify as verify_module
from moe_worker.models.checkpoint import write_checkpoint
from moe_worker.models.verify import INDEX_FILE, CheckpointInvalid, verify
from moe_worker.models.weights import SyntheticWeights
from moe_worker.runtime.loading import open_weights
from moe_worker.settings import WorkerSettings

SHAPE = ModelShape(
    layers=2, experts=4, hidden=32, ffn_hidden=48, heads=4, head_dim=8, vocab_size=80
)
SHARD = "model-00002-of-00003.safetensors"


@pytest.fixture(scope="module")
def intact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = SyntheticWeights.for_shape(SHAPE, seed=1)
    path = write_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny", source, max_shard_bytes=60_000
    )
    assert sorted(p.name for p in path.glob("*.safetensors"))[1] == SHARD
    return path


@pytest.fixture
def copy(intact: Path, tmp_path: Path) -> Path:
    target = tmp_path / "tiny"
    target.mkdir()
    for file in intact.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def truncate(path: Path) -> None:
    shard = path / SHARD
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def set_index(path: Path, change: Callable[[dict], None]) -> None:
    index = json.loads((path / INDEX_FILE).read_text())
    change(index["weight_map"])
    (path / INDEX_FILE).write_text(json.dumps(index))


DAMAGES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (damage, the file named, the problem said)
    "truncated shard": (truncate, SHARD, "truncated: its header places tensors up to byte"),
    "missing shard": (
        lambda p: (p / SHARD).unlink(),
        SHARD,
        f"missing: {INDEX_FILE} lists it for",
    ),
    "config.json not JSON": (
        lambda p: (p / "config.json").write_text('{"model_type": "seed_mlp",'),
        "config.json",
        "not valid JSON",
    ),
    "config.json missing": (lambda p: (p / "config.json").unlink(), "config.json", "missing"),
    "header not safetensors": (
        lambda p: (p / SHARD).write_bytes(b"\xff" * 64),
        SHARD,
        "truncated or not safetensors",
    ),
    "index outside the directory": (
        lambda p: set_index(p, lambda m: m.update({next(iter(m)): "../elsewhere.safetensors"})),
        INDEX_FILE,
        "not a file of the directory",
    ),
    "index names a tensor the shard lacks": (
        lambda p: set_index(p, lambda m: m.update({"model.extra.weight": SHARD})),
        SHARD,
        "puts 1 tensors in it that its header lacks (model.extra.weight)",
    ),
    "tokenizer.json not JSON": (
        lambda p: (p / "tokenizer.json").write_text("{"),
        "tokenizer.json",
        "not valid JSON",
    ),
}


def test_an_intact_checkpoint_passes_and_safetensors_opens_what_passes(intact: Path) -> None:
    verify(intact)
    for file in intact.glob("*.safetensors"):
        assert verify_module.check_safetensors(file) == set(safe_open(str(file), "pt").keys())


@pytest.mark.parametrize("damage", DAMAGES, ids=str)
def test_each_damage_is_refused_naming_the_file_and_the_problem(copy: Path, damage: str) -> None:
    do, file, problem = DAMAGES[damage]
    do(copy)
    with pytest.raises(CheckpointInvalid) as refused:
        verify(copy)
    message = str(refused.value)
    assert message.startswith(f"the checkpoint is invalid: {copy / file}: "), message
    assert problem in message, message
    settings = WorkerSettings(checkpoint=str(copy))  # what a worker starts with
    with pytest.raises(CheckpointInvalid) as refused:
        open_weights(settings)
    assert problem in str(refused.value)


def test_safetensors_itself_refuses_the_truncated_shard(copy: Path) -> None:
    """The outside reference: what the check calls truncated, the library cannot open."""
    truncate(copy)
    with pytest.raises(SafetensorError):
        safe_open(str(copy / SHARD), "pt")


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointInvalid, match=f"{tmp_path / 'absent'}: no such directory"):
        verify(tmp_path / "absent")


def test_a_hanging_volume_is_refused_at_the_deadline(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    monkeypatch.setattr(verify_module, "check_directory", lambda path: release.wait(30))
    start = time.monotonic()
    try:
        with pytest.raises(CheckpointInvalid, match=r"did not finish in 0\.3 s: the volume hangs"):
            verify(copy, timeout_s=0.3)
    finally:
        release.set()
    assert time.monotonic() - start < 5
