"""The printed and JSON report of predictions. PURE: data in, text or JSON-ready dicts out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from moe_contract.shape import ModelShape
from moe_operator.perf.types import Prediction, Profile, Workload

SEED_CLAIMS = {
    "tp8pp2": {"tokens_per_s": 120_000, "tpot_ms": 8.3},
    "ep16": {"tokens_per_s": 450_000, "tpot_ms": 2.2},
}
MODEL_ASSUMPTIONS = (
    "roofline per operation: max(FLOPs / (peak x efficiency), "
    "bytes / (HBM bw x memory efficiency))",
    "attention data-parallel over EP groups (batch/ep sequences each), heads split over TP",
    "experts split over EP ranks (slots), each expert's FFN split over TP; "
    "experts are 2-matrix (SeedMLP) or 3-matrix (SwiGLU) MLPs",
    "shared experts and dense first layers run on every rank like attention (never slots); "
    "MLA caches kv_lora_rank + rope_head_dim values per token and layer, expands latents in "
    "prefill and attends in latent space in decode",
    "imbalance multiplies the slowest EP rank's expert FLOPs and all-to-all bytes (TP ranks: none)",
    "EP all-to-all: dispatch + combine of hidden x dtype x top_k bytes per token; NVLink and IB "
    "parts run concurrently (time = slower of the two)",
    "TP: 2 ring all-reduces per layer (2(n-1)/n of hidden x dtype per token); PP: one p2p per "
    "micro-batch per stage (scattered over TP)",
    "prefill: one pass of the batch, PP bubble (pp-1)/(m+pp-1); decode: steady pipeline, "
    "period = max(m, pp) micro-batch stage times = TPOT",
    "prefill KV is written (not re-read); decode reads the whole KV cache each step",
    "flash-style attention: scores never materialised in memory; no embeddings / LM head modelled",
    "rank order: stage-major, then EP, then TP innermost; node = rank // gpus_per_node",
    "EP bytes crossing nodes: uniform routing over the EP ranks, or a plan's predicted "
    "cross-pod fraction (--cross-pod; `moe-ep plan --ranks-per-pod`, pods being nodes)",
)


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def prediction_dict(p: Prediction) -> dict[str, Any]:
    """One prediction as JSON-ready data (SI units, plus ms / GB conveniences)."""
    mem = p.memory
    return {
        "layout": p.layout.name,
        "phase": p.phase,
        "micro_batches": p.micro_batches,
        "seconds": p.seconds,
        "tokens_per_s": p.tokens_per_s,
        "tpot_ms": None if p.tpot_s is None else p.tpot_s * 1e3,
        "flops_per_token": p.flops_per_token,
        "flop_fraction": p.flop_fraction,
        "bound": p.bound,
        "cross_node_fraction": p.cross_node,
        "breakdown_s": dict(p.breakdown),
        "memory_bytes": {
            "weights": mem.weights,
            "kv_cache": mem.kv_cache,
            "activations": mem.activations,
            "buffers": mem.buffers,
            "total": mem.total,
            "capacity": mem.capacity,
            "fits": mem.fits,
            "per_expert_slot": mem.per_slot,
            "slots_per_rank": mem.slots,
            "spare_slots": mem.spare_slots,
        },
    }


def assumptions(
    profile: Profile, shape: ModelShape, wl: Workload, imbalance: float, overlap: float
) -> dict[str, Any]:
    """Every input and assumption behind a report."""
    figures = {
        **{k: v for k, v in asdict(profile.hardware).items() if k != "name"},
        **asdict(profile.network),
    }
    return {
        "profile": profile.name,
        "figures": {k: {"value": v, "source": profile.source(k)} for k, v in figures.items()},
        "shape": asdict(shape),
        "workload": {"batch": wl.batch, "seq_len": wl.seq_len},
        "imbalance": imbalance,
        "overlap": overlap,
        "model": list(MODEL_ASSUMPTIONS),
    }


def report_dict(preds: Sequence[Prediction], assume: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON report: predictions, first/last layout ratio per phase, assumptions."""
    out: dict[str, Any] = {
        "predictions": [prediction_dict(p) for p in preds],
        "ratios": {},
        "assumptions": dict(assume),
    }
    for phase in ("prefill", "decode"):
        ps = [p for p in preds if p.phase == phase]
        if len(ps) >= 2:
            key = f"{ps[0].layout.name}/{ps[-1].layout.name}"
            out["ratios"][phase] = {key: ps[0].tokens_per_s / ps[-1].tokens_per_s}
    return out


def _row(label: str, cells: Sequence[str], ratio: str = "") -> str:
    return f"{label:<34}" + "".join(f"{c:>16}" for c in cells) + f"{ratio:>10}"


def format_report(preds: Sequence[Prediction], assume: Mapping[str, Any]) -> str:
    """The seed-style table, per-layout breakdowns and every assumption, as text."""
    names = list(dict.fromkeys(p.layout.name for p in preds))
    by = {(p.layout.name, p.phase): p for p in preds}
    phases = [ph for ph in ("prefill", "decode") if any(p.phase == ph for p in preds)]
    lines = [
        f"Predicted on {assume['profile']} (imbalance {assume['imbalance']}, "
        f"overlap {assume['overlap']})",
        "",
        _row("metric", names, "ratio" if len(names) > 1 else ""),
    ]

    def add(label: str, phase: str, fmt, num=None) -> None:
        ps = [by.get((n, phase)) for n in names]
        cells = [fmt(p) if p else "-" for p in ps]
        ratio = ""
        if num and len(ps) > 1 and all(ps):
            ratio = f"{num(ps[0]) / num(ps[-1]):.2f}x"
        lines.append(_row(label, cells, ratio))

    for ph in phases:
        add(f"tokens/s ({ph})", ph, lambda p: f"{p.tokens_per_s:,.0f}", lambda p: p.tokens_per_s)
        if ph == "decode":
            add("TPOT ms (decode)", ph, lambda p: f"{p.tpot_s * 1e3:.2f}", lambda p: 1 / p.tpot_s)
        else:
            add("batch pass s (prefill)", ph, lambda p: f"{p.seconds:.2f}")
        add(f"FLOP ceiling fraction ({ph})", ph, lambda p: f"{p.flop_fraction:.1%}")
        add(
            f"memory/GPU GB ({ph})",
            ph,
            lambda p: _gb(p.memory.total) + ("" if p.memory.fits else " NOFIT"),
        )
        add(f"micro-batches ({ph})", ph, lambda p: str(p.micro_batches))
        add(f"EP bytes crossing nodes ({ph})", ph, lambda p: f"{p.cross_node:.1%}")
    claims = [SEED_CLAIMS.get(n) for n in names]
    if all(claims):
        lines.append(_row("seed claim tokens/s", [f"{c['tokens_per_s']:,}" for c in claims]))
        lines.append(_row("seed claim TPOT ms", [f"{c['tpot_ms']}" for c in claims]))
    lines.append("")
    for p in preds:
        m = p.memory
        lines.append(
            f"{p.layout.name} {p.phase}: bound by {p.bound}; "
            f"memory {_gb(m.total)} of {_gb(m.capacity)} GB "
            f"(weights {_gb(m.weights)}, KV {_gb(m.kv_cache)}, activations "
            f"{_gb(m.activations)}, buffers {_gb(m.buffers)})"
            + ("" if m.fits else "  DOES NOT FIT")
        )
        if m.per_slot > 0 and p.layout.ep > 1:
            lines.append(
                f"    one more expert slot per rank: {_gb(m.per_slot)} GB per GPU; "
                f"{m.spare_slots} more fit (placement.maxSlotsPerRank up to "
                f"{m.slots + m.spare_slots})"
            )
        for label, secs in p.breakdown:
            lines.append(f"    {label:<40}{secs * 1e3:>12.2f} ms  {secs / p.seconds:>6.1%}")
    lines += [
        "",
        "Assumptions",
        f"  shape: {assume['shape']}",
        f"  workload: {assume['workload']}",
        f"  overlap: {assume['overlap']} of min(compute, comm) hidden per layer "
        "(0 = none, 1 = perfect)",
        f"  imbalance: {assume['imbalance']} (max / mean EP rank load)",
        f"  profile {assume['profile']}:",
    ]
    for key, fig in assume["figures"].items():
        lines.append(f"    {key:<24}{fig['value']:>12.4g}  {fig['source']}")
    lines.append("  model:")
    lines += [f"    - {a}" for a in assume["model"]]
    for note in assume.get("calibration_notes", []):
        lines.append(f"  calibration: {note}")
    for key, val in assume.get("measured", {}).items():
        lines.append(f"  measured: {key} = {val:.4g}")
    return "\n".join(lines)
