"""What a router in front of several groups asks a leader besides `/health` (smg 1.13, the
Shepherd Model Gateway, probes these on every worker it discovers; SGLang's shapes).

GET /v1/loads   200 {"timestamp", "dp_rank_count": 1, "loads": [{"dp_rank": 0,
                "num_running_reqs", "num_waiting_reqs", "num_total_reqs", "num_used_tokens",
                "max_total_num_tokens", "token_usage"}]}: the whole group as one rank (the
                router picks a group; the leader's scheduler picks ranks). Load-aware policies
                (power_of_two, least_load, worker overload protection) read it.
GET /model_info 200 {"model_path", "served_model_name", "is_generation": true,
                "max_model_len"}: the served name as the model (what clients ask for).

Neither needs an API key, as `/health`: they tell queue depth and a name, nothing of a
request, and a router holds no client's key. Both answer before the group is ready (an empty
load): a router polls loads only of workers it already deems healthy.
"""

from __future__ import annotations

import datetime

from fastapi import FastAPI
from starlette.responses import JSONResponse, Response

from moe_worker.serving.generation import Backend, ServingLoad


def loads_body(load: ServingLoad) -> dict[str, object]:
    usage = load.used_tokens / load.capacity_tokens if load.capacity_tokens else 0.0
    rank = {
        "dp_rank": 0,
        "num_running_reqs": load.running,
        "num_waiting_reqs": load.waiting,
        "num_total_reqs": load.requests,
        "num_used_tokens": load.used_tokens,
        "max_total_num_tokens": load.capacity_tokens,
        "token_usage": round(usage, 6),
    }
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    return {"timestamp": now, "dp_rank_count": 1, "loads": [rank]}


def add_routes(app: FastAPI, backend: Backend) -> None:
    @app.get("/v1/loads")
    def loads() -> Response:
        return JSONResponse(loads_body(backend.load()))

    @app.get("/model_info")
    def model_info() -> Response:
        card = backend.card
        return JSONResponse(
            {
                "model_path": card.name,
                "served_model_name": card.name,
                "is_generation": True,
                "max_model_len": card.max_context,
            }
        )
