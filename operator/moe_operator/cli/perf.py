"""`moe-ep perf`: predicted throughput of parallel layouts, with every assumption printed.

    moe-ep perf [--profile h100-sxm] [--layouts ep16,tp8pp2] [--imbalance 1.0]
                [--cross-pod F] [--phase prefill|decode|both] [--overlap F] [--json]
                [--gpu-check-json FILE] [--bench-json FILE] [--save-profile FILE]

Layouts: 'ep16', 'tp8pp2', 'ep4tp2', with optional 's<N>' slots per rank and 'm<N>' micro-batches.
The ratio column is first layout / last layout. With --gpu-check-json / --bench-json the profile's
efficiencies are calibrated first (perf_calibrate documents what is read). For EP layouts it also
prints what one more expert slot per rank costs in memory and how many more fit: the choice of
placement.maxSlotsPerRank (take the smallest over the phases you serve). The row "EP bytes
crossing nodes" is the share of all-to-all bytes over the slower network: by default what
uniform routing sends, with --cross-pod a plan's prediction (`moe-ep plan --ranks-per-pod`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from moe_contract.shape import ARCHITECTURES, DTYPE_BYTES, ModelShape
from moe_operator.perf import Workload, parse_layout, predict
from moe_operator.perf.calibrate import calibrate
from moe_operator.perf.profiles import load_profile, profile_to_yaml
from moe_operator.perf.report import assumptions, format_report, report_dict

EXTRA_FLAGS = {
    "dense-layers": "leading dense-MLP layers, beside --layers MoE layers (Glm4MoE, DeepseekV3)",
    "dense-ffn": "inner dimension of the dense layers' MLP",
    "shared-ffn": "inner dimension of the shared expert MLP of each MoE layer",
    "kv-lora-rank": "MLA's key/value latent (DeepseekV3; --head-dim is nope + rope)",
    "q-lora-rank": "MLA's query low-rank width",
    "rope-head-dim": "MLA's rotary part of each query/key head",
    "v-head-dim": "MLA's value head dimension",
}
EXTRA = {
    "dense-layers": "dense_layers",
    "dense-ffn": "dense_ffn_hidden",
    "shared-ffn": "shared_ffn_hidden",
    "kv-lora-rank": "kv_lora_rank",
    "q-lora-rank": "q_lora_rank",
    "rope-head-dim": "rope_head_dim",
    "v-head-dim": "v_head_dim",
}
"""Flag -> the ModelShape field it sets."""


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `moe-ep perf`."""
    d = ModelShape.seed()
    ap = argparse.ArgumentParser(prog="moe-ep perf", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="h100-sxm", help="bundled name or YAML path")
    ap.add_argument("--layouts", default="ep16,tp8pp2", help="comma-separated layouts")
    ap.add_argument("--imbalance", type=float, default=1.0, help="max / mean EP rank load (>= 1)")
    ap.add_argument(
        "--cross-pod",
        type=float,
        help="share of top-K assignments leaving their node, as `moe-ep plan --ranks-per-pod` "
        "predicts (default: uniform routing over the EP ranks)",
    )
    ap.add_argument("--phase", choices=("prefill", "decode", "both"), default="both")
    ap.add_argument(
        "--overlap",
        type=float,
        help="fraction of min(compute, comm) hidden per layer, 0..1 (default: the profile's "
        "overlap_efficiency, which --bench-json calibrates; 0 = none)",
    )
    ap.add_argument("--batch", type=int, default=Workload().batch, help="sequences")
    ap.add_argument("--seq-len", type=int, default=Workload().seq_len, help="tokens per sequence")
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--experts", type=int, default=d.experts)
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--ffn", type=int, default=d.ffn_hidden, help="expert inner dimension")
    ap.add_argument("--heads", type=int, default=d.heads)
    ap.add_argument("--head-dim", type=int, default=d.head_dim)
    ap.add_argument("--top-k", type=int, default=d.top_k)
    ap.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    ap.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=d.dtype)
    ap.add_argument("--architecture", choices=ARCHITECTURES, default=d.architecture)
    sizes = ap.add_argument_group(
        "sizes of some architectures (spec.model's fields of the same names; 0: none)"
    )
    for flag, help_text in EXTRA_FLAGS.items():
        sizes.add_argument(f"--{flag}", type=int, default=0, help=help_text)
    ap.add_argument(
        "--gpu-check-json",
        type=Path,
        help="gpu-check.json of `make gpu-check` (its calibration block is read)",
    )
    ap.add_argument(
        "--bench-json",
        type=Path,
        help="moe-worker bench --json output, or gpu-check.json (MoE/matmul fraction, overlap)",
    )
    ap.add_argument("--save-profile", type=Path, help="write the (calibrated) profile YAML here")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of `moe-ep perf`; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        profile = load_profile(args.profile)
        layouts = [parse_layout(x) for x in args.layouts.split(",") if x.strip()]
        gpu = json.loads(args.gpu_check_json.read_text()) if args.gpu_check_json else None
        bench = json.loads(args.bench_json.read_text()) if args.bench_json else None
    except (OSError, ValueError) as exc:
        print(f"moe-ep perf: {exc}", file=sys.stderr)
        return 2
    notes: tuple[str, ...] = ()
    measured: dict[str, float] = {}
    if gpu is not None or bench is not None:
        cal = calibrate(profile, bench=bench, gpu_check=gpu)
        profile, notes, measured = cal.profile, cal.notes, dict(cal.measured)
    if args.save_profile:
        args.save_profile.write_text(profile_to_yaml(profile))
    try:
        shape = ModelShape(
            layers=args.layers,
            experts=args.experts,
            hidden=args.hidden,
            ffn_hidden=args.ffn,
            heads=args.heads,
            head_dim=args.head_dim,
            top_k=args.top_k,
            dtype=args.dtype,
            architecture=args.architecture,
            kv_heads=args.kv_heads,
            **{field: getattr(args, flag.replace("-", "_")) for flag, field in EXTRA.items()},
        )
    except ValueError as exc:
        print(f"moe-ep perf: {exc}", file=sys.stderr)
        return 2
    overlap = profile.hardware.overlap_efficiency if args.overlap is None else args.overlap
    phases = ("prefill", "decode") if args.phase == "both" else (args.phase,)
    base = Workload(batch=args.batch, seq_len=args.seq_len)
    try:
        preds = [
            predict(
                shape,
                replace(base, phase=ph),
                lay,
                profile,
                args.imbalance,
                overlap,
                args.cross_pod,
            )
            for ph in phases
            for lay in layouts
        ]
    except ValueError as exc:
        print(f"moe-ep perf: {exc}", file=sys.stderr)
        return 2
    assume = assumptions(profile, shape, base, args.imbalance, overlap)
    assume["calibration_notes"] = list(notes)
    assume["measured"] = measured
    if args.json:
        print(json.dumps(report_dict(preds, assume), indent=2))
    else:
        print(format_report(preds, assume))
    return 0


if __name__ == "__main__":
    sys.exit(main())
