"""The gpu-check's JSON document and its Markdown table (pure: dicts in, text out).

The document opens with `calibration`, the figures `moe-ep perf` calibrates from (it reads that
block alone when a document has one): the dense cuBLAS rate, the MoE layer's rate and its fraction
of dense at one EP16 rank of the seed, the seed rank's attention rate (part b), and the two-batch
overlap efficiency (part e). `perf_command` is the one command that records the new prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Figures = Mapping[str, Any]


def document(environment: Figures, parts: Mapping[str, Figures], meta: Figures) -> dict[str, Any]:
    return {
        "calibration": calibration(parts),
        "environment": dict(environment),
        "run": dict(meta),
        "parts": {name: dict(result) for name, result in parts.items()},
    }


def calibration(parts: Mapping[str, Figures]) -> dict[str, float]:
    """What `moe-ep perf --gpu-check-json/--bench-json` reads; only figures that were measured."""
    grouped = _figures(parts, "grouped")
    rank = grouped.get("cases", {}).get("seed_ep16_rank", {})
    found = {
        "matmul_tflops": rank.get("dense_tflops"),
        "expert_tflops": rank.get("moe_tflops"),
        "moe_fraction_of_matmul": rank.get("fraction_of_dense"),
        "attention_tflops": grouped.get("attention", {}).get("attention_tflops"),
        "overlap_efficiency": _figures(parts, "overlap").get("overlap_efficiency"),
    }
    return {name: value for name, value in found.items() if isinstance(value, int | float)}


def perf_command(doc: Figures, path: str = "docs/gpu-check.json") -> str:
    """`moe-ep perf` calibrated from this run, with the bundled profile of the card it ran on."""
    gpu = str(doc.get("environment", {}).get("gpu", ""))
    profile = "h200" if "H200" in gpu else "h100-sxm"
    return f"moe-ep perf --profile {profile} --gpu-check-json {path} --bench-json {path}"


def all_ok(doc: Figures) -> bool:
    """Every part ran to its end and every verdict it gave holds."""
    for result in doc.get("parts", {}).values():
        figures = result.get("figures", {})
        verdicts = [figures.get("ok"), figures.get("check", {}).get("ok")]
        if result.get("status") != "ok" or False in verdicts:
            return False
    return True


# ---------------------------------------------------------------- Markdown


def markdown(doc: Figures) -> str:
    env, run, parts = doc.get("environment", {}), doc.get("run", {}), doc.get("parts", {})
    lines = [
        f"# gpu-check on {env.get('gpu', 'no GPU')} ({run.get('started', '?')})",
        "",
        f"`{run.get('command', '')}`; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
        f"NCCL {env.get('nccl')}, transformers {env.get('transformers')}, Python "
        f"{env.get('python')}; {env.get('gpu_memory_gib')} GiB, {env.get('multiprocessors')} "
        f"SMs; {_num(run.get('seconds'), '.0f')} s in all"
        + (" (tiny sizes)" if run.get("tiny") else ""),
        "",
        "| part | what | status | seconds | headline |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, result in parts.items():
        render = RENDERERS.get(name)
        headline = _safe(render[0], result.get("figures", {})) if render else ""
        status = result.get("status", "?")
        if result.get("error"):
            status += f": {result['error']}"
        lines.append(
            f"| ({result.get('key', '?')}) {name} | {result.get('title', '')} | {status} | "
            f"{_num(result.get('seconds'), '.1f')} | {headline} |"
        )
    for name, result in parts.items():
        render = RENDERERS.get(name)
        figures = result.get("figures", {})
        if render and figures:
            lines += ["", f"## ({result.get('key', '?')}) {name}: {result.get('title', '')}", ""]
            lines += _safe(render[1], figures) or ["(figures incomplete)"]
    lines += ["", "## Calibration for `moe-ep perf`", ""]
    cal = doc.get("calibration", {})
    lines += [f"- {key}: {_num(value, '.3f')}" for key, value in cal.items()] or [
        "- nothing measured"
    ]
    lines += ["", f"`{perf_command(doc)}`", ""]
    return "\n".join(lines)


def _safe(render: Callable[[Figures], Any], figures: Figures) -> Any:
    try:
        return render(figures)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # a part stopped midway
        return ""


def _num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "–"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _figures(parts: Mapping[str, Figures], name: str) -> Figures:
    result = parts.get(name, {})
    figures = result.get("figures", {})
    return figures if isinstance(figures, Mapping) else {}


# (a) parity
def _parity_headline(f: Figures) -> str:
    cases = f["cases"]
    bad = [name for name, case in cases.items() if not case["ok"]]
    return f"{len(cases) - len(bad)}/{len(cases)} cases ok" + (
        f"; failing {', '.join(bad)}" if bad else ""
    )


def _parity_table(f: Figures) -> list[str]:
    rows = []
    for name, c in f["cases"].items():
        rows.append([
            name, c["kernel"], f"{c['logits_max_abs_diff']:.2e}",
            f"{c['logits_relative_diff']:.2e}", f"{c['generations_equal']}/{c['prompts']}",
            f"{c['mean_tokens_agreeing']:.1f}/{c['new_tokens']}", "ok" if c["ok"] else "FAIL",
        ])  # fmt: skip
    header = [
        "model, dtype", "kernel", "logits max diff", "relative", "generations equal",
        "tokens agreeing (mean)", "verdict",
    ]  # fmt: skip
    return _table(header, rows)


# (b) grouped GEMM
def _grouped_headline(f: Figures) -> str:
    rank = f["cases"]["seed_ep16_rank"]
    return (
        f"seed EP16 rank: MoE layer {rank['moe_tflops']:.0f} TFLOP/s = "
        f"{rank['fraction_of_dense']:.2f} of dense ({rank['dense_tflops']:.0f}); "
        f"attention {f['attention']['attention_tflops']:.0f} TFLOP/s"
    )


def _grouped_table(f: Figures) -> list[str]:
    columns = (
        ("loop TFLOP/s", "loop_tflops", ".0f"),
        ("grouped_mm TFLOP/s", "grouped_mm_tflops", ".0f"),
        ("dense TFLOP/s", "dense_tflops", ".0f"),
        ("grouped/loop", "grouped_mm_speedup_over_loop", ".2f"),
        ("MoE / dense", "fraction_of_dense", ".2f"),
        ("max diff", "grouped_mm_max_abs_diff_vs_loop", ".1e"),
    )
    rows = []
    for name, c in f["cases"].items():
        sizes = [name, str(c["slots"]), str(c["tokens_per_expert"])]
        if "skipped" in c:
            rows.append(sizes + [f"skipped: {c['skipped']}"] + [""] * (len(columns) - 1))
        else:
            rows.append(sizes + [_num(c.get(key), spec) for _, key, spec in columns])
    header = ["case", "slots", "tokens/expert", *(title for title, _, _ in columns)]
    a = f.get("attention", {})
    note = [
        "",
        f"Served kernel: {f.get('served_kernel')} ({f.get('dtype')}). Seed rank attention "
        f"({a.get('sequences')} x {a.get('seq_len')} tokens, causal SDPA + projections): "
        f"{_num(a.get('attention_ms'), '.1f')} ms, "
        f"{_num(a.get('attention_tflops'), '.0f')} TFLOP/s; its projections as plain matmuls "
        f"{_num(a.get('projection_matmul_tflops'), '.0f')} TFLOP/s.",
    ]
    return _table(header, rows) + note


# (c) serving
def _serving_headline(f: Figures) -> str:
    ratios = f["tokens_per_s_over_transformers"]
    return "moe-ep / transformers output tokens/s: " + ", ".join(
        f"c={c} {r:.2f}x" for c, r in ratios.items()
    )


def _serving_table(f: Figures) -> list[str]:
    rows = []
    for system in ("moe_ep", "transformers"):
        for c, s in f.get(system, {}).items():
            latencies = [
                s[k] * 1e3 for k in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")
            ]
            rates = [f"{s['requests_per_s']:.2f}", f"{s['output_tokens_per_s']:.0f}"]
            rows.append([system, c, *rates, *(f"{ms:.2f}" for ms in latencies)])
    header = [
        "system", "concurrency", "req/s", "output tok/s",
        "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
    ]  # fmt: skip
    m = f.get("model", {})
    note = [
        "",
        f"Model: random Mixtral, {m.get('num_hidden_layers')} layers x "
        f"{m.get('num_local_experts')} experts top-{m.get('num_experts_per_tok')}, hidden "
        f"{m.get('hidden_size')}, expert ffn {m.get('intermediate_size')}, "
        f"{_num(m.get('parameters'), ',')} parameters, {m.get('dtype')}.",
    ]
    return _table(header, rows) + note


# (d) switch
def _switch_headline(f: Figures) -> str:
    swap = f["cases"]["swap_two_slots"]
    return (
        f"two slots per layer: pause {swap['pause_ms']:.2f} ms = "
        f"{swap['pause_over_decode_step']:.2f} decode steps ({f['decode_step_ms']:.2f} ms)"
    )


def _switch_table(f: Figures) -> list[str]:
    columns = (
        ("MiB written", "bytes_written_mib", ".0f"),
        ("flip, host ms", "pause_host_ms", ".2f"),
        ("flip, device done ms", "pause_ms", ".2f"),
        ("pause / decode step", "pause_over_decode_step", ".2f"),
        ("GB/s", "write_gb_per_s", ".0f"),
    )
    rows = [
        [name, str(c["slots_rewritten_per_layer"]), *(_num(c[k], spec) for _, k, spec in columns)]
        for name, c in f["cases"].items()
    ]
    header = ["switch", "slots rewritten per layer", *(title for title, _, _ in columns)]
    note = [
        "",
        f"Decode step: {_num(f.get('decode_step_ms'), '.2f')} ms before the switches, "
        f"{_num(f.get('decode_step_ms_after'), '.2f')} ms after; kernel {f.get('kernel')}.",
    ]
    return _table(header, rows) + note


# (e) overlap
def _overlap_headline(f: Figures) -> str:
    speedups = ", ".join(f"{name} {link['speedup']:.2f}x" for name, link in f["links"].items())
    return f"efficiency {_num(f.get('overlap_efficiency'), '.2f')}; speedup {speedups}"


def _overlap_table(f: Figures) -> list[str]:
    columns = (
        ("link ms/step", "link_ms_per_step", ".2f"),
        ("compute ms", "compute_ms", ".2f"),
        ("exposed comm ms", "comm_ms", ".2f"),
        ("step ms without", "step_ms_without", ".2f"),
        ("step ms with", "step_ms_with", ".2f"),
        ("speedup", "speedup", ".2f"),
        ("efficiency", "efficiency", ".2f"),
        ("two-batch diff", "two_batch_max_abs_diff", ".1e"),
    )
    rows = [
        [name, *(_num(link[k], spec) for _, k, spec in columns)]
        for name, link in f["links"].items()
    ]
    header = ["link", *(title for title, _, _ in columns)]
    c = f.get("check", {})
    note = [
        "",
        f"{f.get('tokens_per_step')} tokens per step, {_num(f.get('transfer_mib'), '.0f')} MiB "
        f"per transfer, copies at {_num(f.get('copy_gb_per_s'), '.0f')} GB/s. The all-to-all "
        f"path against the per-expert reference ({c.get('kernel')}): one batch "
        f"{_num(c.get('one_batch_max_abs_diff'), '.1e')}, two micro-batches "
        f"{_num(c.get('two_batch_max_abs_diff'), '.1e')} (logits up to "
        f"{_num(c.get('logits_max_abs'), '.1f')}): {'ok' if c.get('ok') else 'FAIL'}.",
    ]
    return _table(header, rows) + note


# (f) memory
def _memory_headline(f: Figures) -> str:
    grow, refuse = f["grow"], f["refuse"]
    peak = _num(grow.get("measured_peak_mib"), ".0f")
    return (
        f"{'ok' if f['ok'] else 'FAIL'}: grow predicted {grow['predicted_mib']:.0f} MiB, peak "
        f"{peak}; refused with {refuse['free_mib_with_ballast']:.0f} MiB free: {refuse['refused']}"
    )


def _memory_table(f: Figures) -> list[str]:
    t, g, r, p = f["tracks_allocation"], f["grow"], f["refuse"], f.get("permute", {})

    def versus(figures: Figures) -> str:
        predicted = _num(figures.get("predicted_mib"), ".0f")
        return f"{predicted} vs {_num(figures.get('measured_peak_mib'), '.0f')} MiB"

    probe = f"probe {t['probe_mib']:.0f} MiB, drop {t['drop_mib']:.0f}, back {t['back_mib']:.0f}"
    short = f"needs {r['needed_mib']:.0f} MiB, {r['free_mib_with_ballast']:.0f} free"
    rows = [
        ["free figure follows a plain allocation", probe, "ok" if t["ok"] else "FAIL"],
        ["one more slot per rank: predicted vs peak", versus(g), _verdict(g)],
        ["refused when short, nothing moved", short, "ok" if r["ok"] else "FAIL"],
        ["permuting slots: predicted vs peak", versus(p), _verdict(p)],
    ]
    return [*_table(["check", "figures", "verdict"], rows), "", f"Refusal: {r['message']}"]


def _verdict(figures: Figures) -> str:
    covers = figures.get("prediction_covers_peak")
    return "–" if covers is None else "covered" if covers else "PEAK ABOVE PREDICTION"


RENDERERS: dict[str, tuple[Callable[[Figures], str], Callable[[Figures], list[str]]]] = {
    "parity": (_parity_headline, _parity_table),
    "grouped": (_grouped_headline, _grouped_table),
    "serving": (_serving_headline, _serving_table),
    "switch": (_switch_headline, _switch_table),
    "overlap": (_overlap_headline, _overlap_table),
    "memory": (_memory_headline, _memory_table),
}
