"""Where a rank's weights come from, given its settings: a Hugging Face checkpoint directory checked
against the shape the deployment declares, or synthetic weights of that shape.

A checkpoint whose config.json disagrees with a declared field (layers, experts, hidden size, ...)
is refused with `ShapeMismatch` naming both values; undeclared fields come from config.json, so
`moe-worker serve --checkpoint DIR` needs no shape at all. A damaged directory (a truncated or
missing shard, a config.json that does not parse) is refused first, naming the file
(`models.verify`).
"""

from __future__ import annotations

from pathlib import Path

from moe_worker.models.checkpoint import HFCheckpoint, ShapeMismatch, check_shape
from moe_worker.models.verify import verify
from moe_worker.models.weights import SyntheticWeights, WeightSource
from moe_worker.serving.generation import ModelCard
from moe_worker.settings import WorkerSettings

__all__ = ["ShapeMismatch", "model_card", "open_weights"]


def open_weights(settings: WorkerSettings) -> tuple[WeightSource, WorkerSettings]:
    """The weight source, and the settings with the model shape it serves (complete)."""
    if not settings.checkpoint:
        return SyntheticWeights.for_shape(settings.model, seed=settings.seed), settings
    verify(settings.checkpoint)  # a damaged one is refused before loading, naming the file
    checkpoint = HFCheckpoint(settings.checkpoint)
    found = checkpoint.spec.shape
    declared = {name: getattr(settings.model, name) for name in settings.declared_shape}
    if declared.get("kv_heads", 0) is None:  # declared as "as many as heads"
        declared["kv_heads"] = declared.get("heads", found.heads)
    expected = found.replace(**declared)
    check_shape(expected, found, where=f"{checkpoint.path / 'config.json'}")
    return checkpoint, settings.replace(model=expected)


def model_card(source: WeightSource, settings: WorkerSettings) -> ModelCard:
    """What the API tells clients about the model this group serves."""
    if settings.served_model_name:
        name = settings.served_model_name
    elif settings.checkpoint:
        name = Path(settings.checkpoint).resolve().name
    else:
        name = f"{settings.model.architecture.lower()}-synthetic"
    tokenizer = getattr(source, "tokenizer_path", None)
    return ModelCard(
        name=name,
        shape=settings.model,
        max_context=source.spec.max_context,
        eos_token_ids=source.spec.eos_token_ids,
        tokenizer_path=None if tokenizer is None else str(tokenizer),
        chat_template_path=settings.chat_template,
    )
