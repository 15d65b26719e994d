"""Checkpoint directories: lazy reads (only the tensors asked for), shards, fused experts, the
config.json checks, and agreement with the shape a deployment declares."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import MixtralConfig, MixtralForCausalLM

from moe_contract.shape import ModelShape
from moe_worker.models import checkpoint as checkpoint_module
from moe_worker.models.checkpoint import (
    CheckpointError,
    HFCheckpoint,
    ShapeMismatch,
    check_shape,
    write_checkpoint,
)
from moe_worker.models.weights import SyntheticWeights, build_model, load_experts

SHAPE = ModelShape(
    layers=3, experts=6, hidden=32, ffn_hidden=48, heads=4, head_dim=8, top_k=2, vocab_size=64
)


class Spy:
    """Wraps safe_open: records every tensor read, whole (get_tensor) or sliced (get_slice)."""

    def __init__(self, real: Any) -> None:
        self.real, self.reads = real, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        handle = self.real(*args, **kwargs)
        spy = self

        class Handle:
            def keys(self) -> list[str]:
                return handle.keys()

            def get_tensor(self, key: str) -> torch.Tensor:
                spy.reads.append(("tensor", key, None))
                return handle.get_tensor(key)

            def get_slice(self, key: str) -> Any:
                real_slice = handle.get_slice(key)

                class Slice:
                    def __getitem__(self, index: Any) -> torch.Tensor:
                        spy.reads.append(("slice", key, index))
                        return real_slice[index]

                return Slice()

            def __enter__(self) -> Handle:
                return self

            def __exit__(self, *_: object) -> None:
                pass

        return Handle()


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    spy = Spy(checkpoint_module.safe_open)
    monkeypatch.setattr(checkpoint_module, "safe_open", spy)
    return spy


@pytest.fixture(scope="module")
def seed_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    source = SyntheticWeights.for_shape(SHAPE, seed=7)
    single = write_checkpoint(tmp_path_factory.mktemp("single"), source)
    sharded = write_checkpoint(tmp_path_factory.mktemp("sharded"), source, max_shard_bytes=20_000)
    return single, sharded


@pytest.fixture(scope="module")
def mixtral_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    torch.manual_seed(1)
    config = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = MixtralForCausalLM(config)
    hub = tmp_path_factory.mktemp("hub")
    fused = tmp_path_factory.mktemp("fused")
    model.save_pretrained(hub)
    model.save_pretrained(fused, save_original_format=False)
    yield hub, fused


def test_only_the_requested_expert_is_read(seed_dirs: tuple[Path, Path], spy: Spy) -> None:
    checkpoint = HFCheckpoint(seed_dirs[1])
    spy.reads.clear()
    checkpoint.expert(1, 4)
    assert spy.reads == [
        ("tensor", "model.layers.1.mlp.experts.4.w_in.weight", None),
        ("tensor", "model.layers.1.mlp.experts.4.w_out.weight", None),
    ]


def test_the_dense_model_reads_no_expert(seed_dirs: tuple[Path, Path], spy: Spy) -> None:
    checkpoint = HFCheckpoint(seed_dirs[1])
    build_model(checkpoint)
    keys = [key for _, key, _ in spy.reads]
    assert keys and not [k for k in keys if ".experts." in k]
    assert len(keys) == len(set(keys)) == len(build_model(checkpoint).state_dict())


def test_a_plans_experts_only(seed_dirs: tuple[Path, Path], spy: Spy) -> None:
    checkpoint = HFCheckpoint(seed_dirs[0])
    wanted = [(0, 1), (2, 5)]
    loaded = load_experts(checkpoint, wanted)
    assert set(loaded) == set(wanted)
    assert {key.split(".experts.")[1].split(".")[0] for _, key, _ in spy.reads} == {"1", "5"}


def test_fused_experts_are_sliced_never_read_whole(
    mixtral_dirs: tuple[Path, Path], spy: Spy
) -> None:
    hub, fused = HFCheckpoint(mixtral_dirs[0]), HFCheckpoint(mixtral_dirs[1])
    spy.reads.clear()
    from_fused = fused.expert(1, 2)
    assert spy.reads == [
        ("slice", "model.layers.1.mlp.experts.gate_up_proj", 2),
        ("slice", "model.layers.1.mlp.experts.down_proj", 2),
    ]
    from_hub = hub.expert(1, 2)
    assert all(
        torch.equal(a, b) for a, b in zip(from_fused.matrices, from_hub.matrices, strict=True)
    )
    assert hub.spec == fused.spec


def test_sharded_and_single_file_checkpoints_hold_the_same_weights(
    seed_dirs: tuple[Path, Path],
) -> None:
    single, sharded = HFCheckpoint(seed_dirs[0]), HFCheckpoint(seed_dirs[1])
    assert (seed_dirs[1] / "model.safetensors.index.json").exists()
    assert len({p.name for p in seed_dirs[1].glob("model-*.safetensors")}) > 2
    first, second = build_model(single).state_dict(), build_model(sharded).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(single.expert(2, 3).flat(), sharded.expert(2, 3).flat())
    synthetic = SyntheticWeights.for_shape(SHAPE, seed=7)
    assert torch.equal(single.expert(2, 3).flat(), synthetic.expert(2, 3).flat())
    assert single.spec == synthetic.spec


def test_a_disagreeing_config_names_every_field(seed_dirs: tuple[Path, Path]) -> None:
    found = HFCheckpoint(seed_dirs[0]).spec.shape
    check_shape(SHAPE, found)  # agrees
    check_shape(SHAPE.replace(dtype="bfloat16"), found)  # the serving dtype may differ
    declared = SHAPE.replace(layers=4, experts=8, kv_heads=2)
    with pytest.raises(ShapeMismatch) as error:
        check_shape(declared, found)
    message = str(error.value)
    assert "layers: the MoEDeployment says 4, config.json says 3" in message
    assert "experts: the MoEDeployment says 8, config.json says 6" in message
    assert "kv_heads: the MoEDeployment says 2, config.json says 4" in message
    assert "hidden" not in message
    with pytest.raises(ShapeMismatch, match="dtype"):
        check_shape(SHAPE.replace(dtype="bfloat16"), found, compare_dtype=True)


def test_eos_ids_context_and_tokenizer(seed_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    path = Path(shutil.copytree(seed_dirs[0], tmp_path / "model"))
    config = json.loads((path / "config.json").read_text())
    config.update(eos_token_id=2, max_position_embeddings=512)
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2]}))
    assert HFCheckpoint(path).tokenizer_path is None
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    checkpoint = HFCheckpoint(path)
    assert checkpoint.eos_token_ids == (5, 2)
    assert checkpoint.max_context == 512
    assert checkpoint.tokenizer_path is not None
    assert Tokenizer.from_file(str(checkpoint.tokenizer_path)).encode("hello world").ids == [1, 2]


def test_missing_pieces_are_named(seed_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json does not exist"):
        HFCheckpoint(tmp_path)
    (tmp_path / "config.json").write_text((seed_dirs[0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor"):
        HFCheckpoint(tmp_path)
    config = json.loads((seed_dirs[0] / "config.json").read_text())
    config["num_local_experts"] = 7  # the config promises an expert the file lacks
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((seed_dirs[0] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="no weights for expert 6 of layer 0"):
        HFCheckpoint(tmp_path).expert(0, 6)
    config["hidden_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"the checkpoint has \[64, 32\], expected \[64, 48\]"
    ):
        build_model(HFCheckpoint(tmp_path))
