"""Calibrate a profile's efficiencies from measurements. PURE (stdlib): takes parsed JSON documents.

The two inputs are written by the worker and their exact schemas may change, so the reader is
tolerant: it flattens a document into lower-case dotted paths of numeric leaves
(`{"ep": {"tokens_per_s": 5}}` -> `ep.tokens_per_s = 5`) and matches words in the paths.
A figure it cannot find is left as it was, and the notes say so. A document with a top-level
`calibration` mapping (`make gpu-check`'s gpu-check.json, which holds far more figures besides)
is read from that block alone, by the same rules. What it reads:

`python -m moe_worker.bench.gpu_check --json` (one GPU, seed shapes):
- plain matmul rate: a path with `matmul`, `cublas`, `gemm` or `dense` and a FLOP unit
  -> matmul_efficiency = rate / peak_flops (the highest such rate).
- expert rate: a path with `expert`, `moe` or `ffn` (and no matmul word) and a FLOP unit
  -> expert_efficiency = rate / peak_flops.
- attention rate: a path with `attention` or `attn` (and no matmul word) and a FLOP unit
  -> attention_efficiency = rate / peak_flops.
  FLOP units by key: `tflop` (x 1e12), `gflop` (x 1e9), otherwise `flop` (FLOP/s).

`moe-worker bench --json`:
- MoE vs matmul: a path with `matmul` and `fraction`, `ratio` or `vs` -> expert_efficiency =
  matmul_efficiency x fraction (only when gpu_check gave no expert rate).
- collective bandwidth: a path with `alltoall`, `all_to_all`, `a2a`, `allreduce` or `collective` and
  `bandwidth`, `gbps`, `busbw` or `bytes_per_s` -> collective_efficiency =
  bandwidth / intra_bandwidth (`gb` in the key means x 1e9 bytes/s).
- two-batch overlap: `overlap_efficiency` (else the first path with `overlap` and `efficiency`)
  -> overlap_efficiency, the fraction of min(compute, comm) hidden per layer, clamped to [0, 1]
  (0 is a measurement here, not a missing figure); `moe-ep perf` uses it unless `--overlap`.
- tokens/s of the EP and the TP x PP layouts (a path with `tokens_per_s`, `tokens_s`, `tps` or
  `throughput`, and a word starting `ep` or `tp`/`pp`/`baseline`), and the plan-switch pause (a path
  with `switch` or `pause`; `ms` in the key means milliseconds): recorded in `measured`, for the
  predicted-vs-measured table; they do not change the profile.
Efficiencies are clamped to (0, 1]; a clamp is noted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from moe_operator.perf.types import Profile

_MATMUL = ("matmul", "cublas", "gemm", "dense")


@dataclass(frozen=True)
class Calibration:
    """A calibrated profile, what was read (name -> value, SI units), and notes for the report."""

    profile: Profile
    measured: tuple[tuple[str, float], ...]
    notes: tuple[str, ...]


def flatten(doc: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON document by lower-case dotted path (lists indexed)."""
    out: dict[str, float] = {}
    if isinstance(doc, Mapping):
        items = [(str(k), v) for k, v in doc.items()]
    elif isinstance(doc, list | tuple):
        items = [(str(i), v) for i, v in enumerate(doc)]
    else:
        if isinstance(doc, int | float) and not isinstance(doc, bool):
            out[prefix.lower()] = float(doc)
        return out
    for key, val in items:
        out.update(flatten(val, f"{prefix}.{key}" if prefix else key))
    return out


def _words(path: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", path) if w]


def _has(path: str, *subs: str) -> bool:
    return any(s in path for s in subs)


def _flop_rate(path: str, value: float) -> float | None:
    """FLOP/s from a key naming its unit, else None."""
    last = path.rsplit(".", 1)[-1]
    if "tflop" in last:
        return value * 1e12
    if "gflop" in last:
        return value * 1e9
    if "flop" in last and "fraction" not in last and "ratio" not in last:
        return value
    return None


def _rates(flat: dict[str, float], words: tuple[str, ...], matmul: bool) -> list[float]:
    rates = []
    for path, value in flat.items():
        rate = _flop_rate(path, value)
        if rate is None or not _has(path, *words):
            continue
        if not matmul and _has(path, *_MATMUL):
            continue
        rates.append(rate)
    return rates


def _clamp(name: str, value: float, notes: list[str]) -> float:
    if value <= 0:
        notes.append(f"{name}: measured {value:.3g} <= 0, ignored")
        return float("nan")
    if value > 1:
        notes.append(f"{name}: measured {value:.3g} > 1 of peak, clamped to 1.0 (check the peak)")
        return 1.0
    return value


def _read_bench(flat: dict[str, float], measured: dict[str, float]) -> None:
    for path, value in flat.items():
        words = _words(path)
        if _has(path, "tokens_per_s", "tokens_s", "throughput") or "tps" in words:
            if any(w.startswith(("tp", "pp", "baseline")) and w != "tps" for w in words):
                measured.setdefault("tokens_per_s_tp_pp", value)
            elif any(w.startswith("ep") for w in words):
                measured.setdefault("tokens_per_s_ep", value)
        elif _has(path, "switch", "pause"):
            scale = 1e-3 if "ms" in _words(path.rsplit(".", 1)[-1]) else 1.0
            key = "plan_switch_nonblocking_s" if "nonblocking" in path else "plan_switch_s"
            measured.setdefault(key, value * scale)


def _overlap_efficiency(flat: dict[str, float]) -> float | None:
    if "overlap_efficiency" in flat:
        return flat["overlap_efficiency"]
    found = [v for p, v in flat.items() if "overlap" in p and "efficiency" in p]
    return found[0] if found else None


def _calibration_block(doc: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The document's `calibration` block when it has one, else the whole document."""
    if doc is None:
        return {}
    block = doc.get("calibration")
    return block if isinstance(block, Mapping) else doc


def calibrate(
    profile: Profile,
    bench: Mapping[str, Any] | None = None,
    gpu_check: Mapping[str, Any] | None = None,
) -> Calibration:
    """Profile with efficiencies replaced by measured ones where the documents give them."""
    hw, notes, measured = profile.hardware, [], {}
    new: dict[str, float] = {}
    sources = dict(profile.sources)
    g = flatten(_calibration_block(gpu_check))
    b = flatten(_calibration_block(bench))

    for name, words, mm in (
        ("matmul_efficiency", _MATMUL, True),
        ("expert_efficiency", ("expert", "moe", "ffn"), False),
        ("attention_efficiency", ("attention", "attn"), False),
    ):
        rates = _rates(g, words, mm)
        if rates:
            measured[name.replace("efficiency", "flops")] = max(rates)
            new[name] = _clamp(name, max(rates) / hw.peak_flops, notes)
            sources[name] = "calibrated from gpu_check JSON"
    mm_eff = new.get("matmul_efficiency", hw.matmul_efficiency)

    frac = [v for p, v in b.items() if "matmul" in p and _has(p, "fraction", "ratio", "vs")]
    if frac:
        measured["moe_vs_matmul"] = frac[0]
        if "expert_efficiency" not in new:
            new["expert_efficiency"] = _clamp("expert_efficiency", mm_eff * frac[0], notes)
            sources["expert_efficiency"] = (
                "calibrated: matmul_efficiency x bench MoE/matmul fraction"
            )

    coll = ("alltoall", "all_to_all", "a2a", "allreduce", "collective")
    for path, value in b.items():
        if _has(path, *coll) and _has(path, "bandwidth", "gbps", "busbw", "bytes_per_s"):
            bw = value * (1e9 if "gb" in path.rsplit(".", 1)[-1] else 1.0)
            measured["collective_bandwidth"] = bw
            eff = bw / profile.network.intra_bandwidth
            new["collective_efficiency"] = _clamp("collective_efficiency", eff, notes)
            sources["collective_efficiency"] = "calibrated from bench collective bandwidth"
            break

    overlap = _overlap_efficiency(b)
    if overlap is not None:
        measured["overlap_efficiency"] = overlap
        new["overlap_efficiency"] = min(1.0, max(0.0, overlap))
        sources["overlap_efficiency"] = "calibrated from bench two-batch overlap (CPU, gloo)"

    _read_bench(b, measured)
    new = {k: v for k, v in new.items() if v == v}  # drop NaN (ignored figures)
    known = {f.name for f in fields(hw)}
    for name in ("matmul_efficiency", "expert_efficiency", "attention_efficiency"):
        if name not in new:
            notes.append(f"{name}: not found in the inputs, kept {getattr(hw, name):.2f}")
    hw2 = replace(hw, **{k: v for k, v in new.items() if k in known})
    cal = replace(profile, hardware=hw2, sources=tuple(sorted(sources.items())))
    if new:
        cal = replace(cal, name=f"{profile.name}+calibrated")
    return Calibration(cal, tuple(sorted(measured.items())), tuple(notes))
