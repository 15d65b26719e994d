"""Hugging Face checkpoint directories, read tensor by tensor; their agreement with a deployment.

A directory holds `config.json`, `model.safetensors` or shards listed by
`model.safetensors.index.json`, optionally `generation_config.json` and `tokenizer.json`. Files
are opened with safetensors' lazy `safe_open` (memory-mapped, header only): `dense()` reads one
tensor, `expert()` one expert, so a rank touches only its plan's experts. Fused expert tensors
([E, ...], transformers 5's in-memory layout) are sliced with `get_slice`, never read whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from moe_contract.shape import ModelShape
from moe_worker.models import (
    Architecture,
    ExpertWeights,
    ModelSpec,
    MoETransformer,
    parse_hf_config,
)
from moe_worker.models.base import DTYPES
from moe_worker.models.config import token_ids
from moe_worker.models.weights import WeightSource

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that is incomplete or does not fit its own config."""


class ShapeMismatch(ValueError):
    """The checkpoint's config.json disagrees with the shape the deployment declares."""


def check_shape(
    declared: ModelShape,
    found: ModelShape,
    *,
    where: str = "config.json",
    compare_dtype: bool = False,
) -> None:
    """Raise ShapeMismatch naming every field where `found` (the checkpoint) disagrees.

    dtype is the serving dtype and weights are cast to it, so it is compared only on request.
    kv_heads None and kv_heads == heads mean the same and compare equal.
    """
    ours, theirs = _canonical(declared), _canonical(found)
    problems = [
        f"{name}: the MoEDeployment says {mine!r}, {where} says {other!r}"
        for name, mine, other in ours.differences(theirs)
        if compare_dtype or name != "dtype"
    ]
    if problems:
        raise ShapeMismatch("the checkpoint does not match the model shape: " + "; ".join(problems))


def _canonical(shape: ModelShape) -> ModelShape:
    return shape.replace(kv_heads=shape.key_value_heads)


class HFCheckpoint:
    """A `WeightSource` over a Hugging Face directory; open file handles are kept until close()."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config: dict[str, Any] = _read_json(self.path / "config.json")
        self.arch: Architecture
        self.arch, spec = parse_hf_config(self.config)
        generation = self.path / "generation_config.json"
        eos = token_ids(_read_json(generation).get("eos_token_id")) if generation.exists() else ()
        self.spec: ModelSpec = spec.replace(
            eos_token_ids=tuple(dict.fromkeys((*eos, *spec.eos_token_ids)))
        )
        self._files = self._weight_map()
        self._handles: dict[str, Any] = {}

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.spec.eos_token_ids

    @property
    def max_context(self) -> int:
        return self.spec.max_context

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.path / "tokenizer.json"
        return path if path.exists() else None

    def keys(self) -> list[str]:
        return list(self._files)

    def dense(self, name: str, shape: tuple[int, ...]) -> Tensor:
        key = self._first(self.arch.checkpoint_keys(name, self.spec), name)
        return _checked(key, self._open(key).get_tensor(key), shape)

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        """Routed expert `expert` of MoE layer `layer` (block dense_layers + layer)."""
        shapes = self.arch.expert_shapes(self.spec.shape)
        block = self.spec.shape.dense_layers + layer
        keys = self.arch.expert_keys(block, expert)
        fused = self.arch.fused_expert_keys(block)
        if all(k in self._files for k in keys):
            tensors = [self._open(k).get_tensor(k) for k in keys]
            weights = ExpertWeights(tuple(tensors))
        elif fused and all(k in self._files for k in fused):
            weights = self.arch.expert_from_fused(
                [self._open(k).get_slice(k)[expert] for k in fused]
            )
        else:
            raise CheckpointError(
                f"{self.path}: no weights for expert {expert} of layer {block} "
                f"(looked for {list(keys)}" + (f" or {list(fused)})" if fused else ")")
            )
        for name, matrix, shape in zip(
            self.arch.expert_matrices, weights.matrices, shapes, strict=True
        ):
            _checked(f"layer {layer} expert {expert} {name}", matrix, shape)
        return weights

    def close(self) -> None:
        self._handles.clear()  # safe_open handles unmap when released

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            return dict(_read_json(index)["weight_map"])
        single = self.path / SINGLE_FILE
        if single.exists():
            with safe_open(str(single), framework="pt") as handle:
                return {key: SINGLE_FILE for key in handle.keys()}  # noqa: SIM118 (not a dict)
        raise CheckpointError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE}")

    def _first(self, keys: tuple[str, ...], name: str) -> str:
        for key in keys:
            if key in self._files:
                return key
        raise CheckpointError(f"{self.path}: no tensor for {name} (looked for {list(keys)})")

    def _open(self, key: str) -> Any:
        file = self._files[key]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.path / file), framework="pt")
        return self._handles[file]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None


def _checked(key: str, tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(
            f"{key}: the checkpoint has {list(tensor.shape)}, expected {list(shape)}"
        )
    return tensor


def write_checkpoint(
    path: str | Path, source: WeightSource, *, max_shard_bytes: int | None = None
) -> Path:
    """Write `source` as a Hugging Face directory in the hub layout (per-expert tensors).

    For families with a config.json of our own (SeedMLP); sharded with an index when
    `max_shard_bytes` is given. Tests and demos use it to make checkpoints without transformers.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arch, spec = source.arch, source.spec
    (path / "config.json").write_text(json.dumps(arch.to_config(spec), indent=2))
    tensors: dict[str, Tensor] = {}
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in MoETransformer(arch, spec).named_parameters()}
    for name, shape in shapes.items():
        tensors[arch.checkpoint_keys(name, spec)[0]] = source.dense(name, shape)
    for layer in range(spec.shape.layers):
        for e in range(spec.shape.experts):
            keys = arch.expert_keys(spec.shape.dense_layers + layer, e)
            tensors.update(zip(keys, source.expert(layer, e).matrices, strict=True))
    tensors = {k: t.to(DTYPES[spec.shape.dtype]).contiguous() for k, t in tensors.items()}
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE))
        return path
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file))
        weight_map.update(dict.fromkeys(shard, file))
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _shards(tensors: dict[str, Tensor], max_bytes: int | None) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards
