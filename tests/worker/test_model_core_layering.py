"""Layering of the model core: transformers and tokenizers are test-only, and the models, weights,
KV cache, sampling and generator import no HTTP, metrics or cluster code (STYLE.md, point 2)."""

from __future__ import annotations

import json
import subprocess
import sys

MODEL_CORE = [
    "moe_worker.models",
    "moe_worker.models.kv_cache",
    "moe_worker.models.weights",
    "moe_worker.models.checkpoint",
    "moe_worker.ep.sampling",
    "moe_worker.bench.generator",
]


def test_the_model_core_imports_no_test_only_http_or_cluster_code() -> None:
    code = (
        f"import importlib, json, sys\nfor m in {MODEL_CORE!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = set(json.loads(result.stdout))
    roots = {name.split(".")[0] for name in loaded}
    assert not roots & {"transformers", "tokenizers", "aiohttp", "prometheus_client", "kopf"}
    assert not roots & {"kubernetes", "kmock"}
    assert not loaded & {"moe_worker.api", "moe_worker.metrics", "moe_worker.runtime.rank"}
