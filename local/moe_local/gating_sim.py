"""`moe-ep gating-sim`: what rebalancing by gate bias buys, and what it costs in changed routing.

    moe-ep gating-sim [--zipf 0.5,1.0,1.5] [--experts 16 --ranks 16 --slots-per-rank 1
                      --top-k 2] [--layers 4] [--evaluations 20] [--tokens 20000] [--json]
                      [--router sigmoid --model-bias 0.5 --groups 4 --topk-groups 2]

It runs the real parts, evaluation after evaluation: the worker's own router
(`moe_worker.models.route_priced`: softmax, guarded biased top-K, the price of the bias) routes
tokens, the load per expert is counted, and the operator's own planner (`plan_rebalance`) turns
the loads (and the measured rerouted fraction per layer, as the operator will read it from the
workers) into the next plan, which the next evaluation routes with. It lives in the local tooling
because it needs both products: the operator never imports torch, the worker never imports the
operator.

The model's router is softmax (Mixtral, Qwen) by default; `--router sigmoid` routes as GLM-4.5 and
DeepSeek-V3 do (sigmoid scores, group-limited top-K over `--groups`, renormalised), starting from
a non-zero model bias with `--model-bias S`: the checkpoint's `e_score_correction_bias` as
auxiliary-loss-free training leaves it, per layer S x (ln(p(e) + 1) / ln E) centred, which lifts
the cold experts and lowers the hot ones. The operator's bias adds to it, as on the workers.

Traffic: per layer, a fixed random gate (hidden D=64 -> E logits of unit variance) on fresh
random hidden states each evaluation, plus a Zipf popularity offset on the gate logits,
offset[e] = -s * ln(p(e) + 1) with the popularity order p fixed per layer by a seeded shuffle:
expert p(e) = 0 is the hottest. The same tokens go through every setting.

Settings (rows): no rebalancing is the "before" column; the sign rule the operator used before
(b += rate * sign(mean - load), clamped; kept here only to compare); the damped rule
(`planning.gating`) without and with the margin guard, under several price caps
(maxReroutedFraction); and one spare slot per rank (placement.maxSlotsPerRank = slotsPerRank + 1:
Auto grows the plan and uses Replace, which changes no routing).

Reported per (Zipf, setting), imbalance being the worst layer's max/mean rank load: before (the
round-robin plan, unbiased), after the last evaluation, the worst value over the last half of the
evaluations (oscillation shows here), the evaluation after which it stays within 5% of the final
value, the rerouted fraction (top-K assignments whose expert is not the model's own choice, all
layers, last evaluation), the gate probability lost per token, and - where one expert sits on
each rank - the least imbalance any rerouting of that many assignments could reach (moving them
from the hottest experts to the coolest: a bound, not a method).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from moe_contract.plan import Plan, round_robin_plan
from moe_operator.planning.gating import GatingOptions
from moe_operator.planning.placement import imbalance, rank_loads
from moe_operator.planning.planners import AUTO, GATING_BIAS, plan_rebalance

HIDDEN = 64
SETTLED_WITHIN = 0.05
"""An imbalance within this fraction of the final one counts as settled."""


@dataclass(frozen=True)
class Layout:
    experts: int = 16
    ranks: int = 16
    slots_per_rank: int = 1
    top_k: int = 2
    layers: int = 4


@dataclass(frozen=True)
class ModelRouter:
    """The model's own router: softmax, or sigmoid with a correction bias of scale `model_bias`
    and `groups` groups of which `topk_groups` are chosen from."""

    scoring: str = "softmax"
    model_bias: float = 0.0
    groups: int = 1
    topk_groups: int = 1

    def spec(self) -> Any:
        from moe_worker.models.config import RouterSpec

        if self.scoring == "softmax":
            return RouterSpec()
        return RouterSpec("sigmoid", self.groups, self.topk_groups)


@dataclass(frozen=True)
class Setting:
    """One way of rebalancing, a row of the table."""

    name: str
    rule: str
    """"none", "sign" (the rule before the damped one), "damped" or "spare-slots"."""
    options: GatingOptions | None = None
    sign_rate: float = 0.0
    sign_max_bias: float = 0.0
    max_slots_per_rank: int | None = None


@dataclass
class Outcome:
    zipf: float
    setting: str
    rule: str
    max_margin: float | None
    max_rerouted_fraction: float | None
    before: float
    after: float
    worst_late: float
    settled_at: int
    rerouted_fraction: float
    rerouted_fraction_worst_layer: float
    rerouted_peak: float
    """The worst layer's rerouted fraction at its worst evaluation."""
    lost_weight_per_token: float
    least_at_that_price: float | None
    slots_per_rank: int
    slots_moved: int
    history: list[float] = field(default_factory=list)


def default_settings(
    layout: Layout, rate: float | None = None, damping: float | None = None
) -> list[Setting]:
    """The rows of the frontier: the old rule, the damped rule without and with the guard under
    several price caps (max_bias 1, so that the cap is what limits the bias), the operator's
    defaults, and a spare slot."""
    base = GatingOptions()
    rate = base.rate if rate is None else rate
    damping = base.damping if damping is None else damping
    rows = [
        Setting("sign rule, rate 0.01, max 0.1 (the old defaults)", "sign", None, 0.01, 0.1),
        Setting("sign rule, rate 0.05, max 0.5", "sign", None, 0.05, 0.5),
    ]
    for margin in (None, base.max_margin):
        guard = "no guard" if margin is None else f"guard {margin:g}"
        for cap in (0.05, 0.1, 0.2, 0.3, None):
            label = "no cap" if cap is None else f"cap {cap:g}"
            options = GatingOptions(
                rate=rate,
                damping=damping,
                max_bias=1.0,
                max_margin=margin,
                max_rerouted_fraction=cap,
            )
            rows.append(Setting(f"damped, {guard}, {label}", "damped", options))
    defaults = GatingOptions(rate=rate, damping=damping)
    rows.append(
        Setting(
            f"damped, the defaults (guard {defaults.max_margin:g}, cap "
            f"{defaults.max_rerouted_fraction:g}, max bias {defaults.max_bias:g})",
            "damped",
            defaults,
        )
    )
    rows.append(
        Setting(
            f"spare slot: maxSlotsPerRank {layout.slots_per_rank + 1} (Auto -> Replace)",
            "spare-slots",
            max_slots_per_rank=layout.slots_per_rank + 1,
        )
    )
    return rows


class Traffic:
    """Gate logits of fresh tokens per (layer, evaluation): a fixed random gate + Zipf offset."""

    def __init__(
        self,
        layout: Layout,
        zipf: float,
        tokens: int,
        seed: int,
        router: ModelRouter | None = None,
    ) -> None:
        import torch

        self.torch, self.layout, self.tokens, self.seed = torch, layout, tokens, seed
        self.router = router or ModelRouter()
        generator = torch.Generator().manual_seed(seed)
        self.gates_LDE = torch.randn(layout.layers, HIDDEN, layout.experts, generator=generator)
        self.gates_LDE /= math.sqrt(HIDDEN)
        offsets, model_bias = [], []
        for layer in range(layout.layers):
            popularity = list(range(layout.experts))
            random.Random(seed * 100_003 + layer).shuffle(popularity)
            offsets.append([-zipf * math.log(popularity[e] + 1) for e in range(layout.experts)])
            lift = [math.log(p + 1) / math.log(layout.experts) for p in popularity]
            centre = sum(lift) / len(lift)
            model_bias.append([self.router.model_bias * (v - centre) for v in lift])
        self.offsets_LE = torch.tensor(offsets)
        self.model_bias_LE = torch.tensor(model_bias)
        """The checkpoint's correction bias [L, E] (sigmoid routers; zeros without one)."""

    def route(self, layer: int, evaluation: int, bias_E: Any, margin: float | None) -> Any:
        """The worker's router on this layer's tokens: (routing, price)."""
        from moe_worker.models import route_priced

        sigmoid = self.router.scoring == "sigmoid"
        return route_priced(
            self.logits(layer, evaluation),
            self.layout.top_k,
            gate_bias_E=bias_E,
            max_margin=margin,
            router=self.router.spec(),
            correction_E=self.model_bias_LE[layer] if sigmoid else None,
        )

    def logits(self, layer: int, evaluation: int) -> Any:
        torch = self.torch
        key = (self.seed * 1_000_003 + evaluation) * 1_009 + layer
        x_ND = torch.randn(self.tokens, HIDDEN, generator=torch.Generator().manual_seed(key))
        return x_ND @ self.gates_LDE[layer] + self.offsets_LE[layer]


def least_imbalance(expert_load: Sequence[float], fraction: float) -> float:
    """The least max/mean any rerouting of `fraction` of the assignments could reach, moving
    them from the hottest experts to the coolest (one expert per rank): a bound, not a method."""
    total = sum(expert_load)
    mean = total / len(expert_load)
    budget = fraction * total
    low, high = mean, max(expert_load)
    for _ in range(60):  # bisect the level the hottest experts can be brought down to
        level = (low + high) / 2
        if sum(max(0.0, load - level) for load in expert_load) <= budget:
            high = level
        else:
            low = level
    return high / mean if mean > 0 else 1.0


def sign_rule(plan: Plan, loads: Sequence[Sequence[float]], rate: float, bound: float) -> Plan:
    """The update the operator used before the damped one, for comparison only."""
    old = plan.gate_bias or tuple((0.0,) * len(row) for row in loads)
    bias = []
    for layer_bias, layer_load in zip(old, loads, strict=True):
        mean = sum(layer_load) / len(layer_load)
        bias.append(
            tuple(
                min(bound, max(-bound, b + rate * ((mean > load) - (mean < load))))
                for b, load in zip(layer_bias, layer_load, strict=True)
            )
        )
    return plan.model_copy(update={"version": plan.version + 1, "gate_bias": tuple(bias)})


def simulate(
    traffic: Traffic, layout: Layout, setting: Setting, evaluations: int, zipf: float
) -> Outcome:
    """Route, count, plan; `evaluations` times after the first (unbiased) window."""
    torch = traffic.torch
    plan = round_robin_plan(layout.layers, layout.experts, layout.ranks, layout.slots_per_rank)
    start = plan
    history: list[float] = []
    first_loads: list[list[float]] = []
    fractions: list[float] = []
    peak, lost = 0.0, 0.0
    for evaluation in range(evaluations + 1):
        margin = plan.gate_max_margin
        loads, fractions, lost, rerouted = [], [], 0.0, 0
        for layer in range(layout.layers):
            bias_E = None if plan.gate_bias is None else torch.tensor(plan.gate_bias[layer])
            routing, price = traffic.route(layer, evaluation, bias_E, margin)
            counts = torch.bincount(routing.topk_ids_NK.flatten(), minlength=layout.experts)
            loads.append([float(c) for c in counts.tolist()])
            layer_rerouted, layer_lost = price.totals()
            rerouted += layer_rerouted
            lost += layer_lost
            fractions.append(layer_rerouted / (traffic.tokens * layout.top_k))
        peak = max(peak, *fractions)
        if evaluation == 0:
            first_loads = loads
        history.append(
            max(
                imbalance(rank_loads(layer_slots, layer_load))
                for layer_slots, layer_load in zip(plan.slots, loads, strict=True)
            )
        )
        if evaluation < evaluations:
            plan = _next_plan(plan, loads, fractions, layout, setting)
    total_fraction = sum(fractions) / len(fractions)
    options = setting.options
    return Outcome(
        zipf=zipf,
        setting=setting.name,
        rule=setting.rule,
        max_margin=None if options is None else options.max_margin,
        max_rerouted_fraction=None if options is None else options.max_rerouted_fraction,
        before=history[0],
        after=history[-1],
        worst_late=max(history[len(history) // 2 :]),
        settled_at=_settled_at(history),
        rerouted_fraction=total_fraction,
        rerouted_fraction_worst_layer=max(fractions),
        rerouted_peak=peak,
        lost_weight_per_token=lost / (traffic.tokens * layout.layers),
        least_at_that_price=_rounded(_least(first_loads, fractions, layout, setting)),
        slots_per_rank=plan.slots_per_rank,
        slots_moved=_moved(start, plan),
        history=[round(value, 4) for value in history],
    )


def _next_plan(
    plan: Plan,
    loads: list[list[float]],
    fractions: list[float],
    layout: Layout,
    setting: Setting,
) -> Plan:
    if setting.rule == "none":
        return plan
    if setting.rule == "sign":
        return sign_rule(plan, loads, setting.sign_rate, setting.sign_max_bias)
    return plan_rebalance(
        loads,
        world_size=layout.ranks,
        slots_per_rank=layout.slots_per_rank,
        previous=plan,
        method=AUTO if setting.rule == "spare-slots" else GATING_BIAS,
        gating_options=setting.options,
        max_slots_per_rank=setting.max_slots_per_rank,
        rerouted_fraction=fractions,
    ).plan


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _settled_at(history: Sequence[float]) -> int:
    final = history[-1]
    settled = len(history) - 1
    while settled > 0 and abs(history[settled - 1] - final) <= SETTLED_WITHIN * final:
        settled -= 1
    return settled


def _least(
    loads: list[list[float]], fractions: list[float], layout: Layout, setting: Setting
) -> float | None:
    if setting.rule in ("none", "spare-slots"):
        return None  # no rerouting
    if layout.slots_per_rank != 1 or layout.experts != layout.ranks:
        return None  # rank load is expert load only with one expert per rank
    return max(
        least_imbalance(layer_load, fraction)
        for layer_load, fraction in zip(loads, fractions, strict=True)
    )


def _moved(start: Plan, end: Plan) -> int:
    from moe_contract.plan import moved_experts

    return sum(moved_experts(a, b) for a, b in zip(start.slots, end.slots, strict=True))


def run(
    zipfs: Sequence[float],
    layout: Layout,
    *,
    evaluations: int = 20,
    tokens: int = 20_000,
    seed: int = 0,
    settings: Sequence[Setting] | None = None,
    router: ModelRouter | None = None,
) -> list[Outcome]:
    """Every setting on the same traffic, for each Zipf exponent."""
    rows = list(settings or default_settings(layout))
    outcomes = []
    for zipf in zipfs:
        traffic = Traffic(layout, zipf, tokens, seed, router)
        outcomes += [simulate(traffic, layout, row, evaluations, zipf) for row in rows]
    return outcomes


def table(outcomes: Sequence[Outcome], evaluations: int) -> str:
    """The Markdown table for docs/rebalancing.md."""
    lines = [
        f"| Zipf s | setting | imbalance before | after {evaluations} evaluations | worst in "
        "last half | settled at | rerouted: all layers / worst layer / worst layer's peak | gate "
        "prob. lost per token | least imbalance at that price |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        least = "-" if o.least_at_that_price is None else f"{o.least_at_that_price:.2f}"
        lines.append(
            f"| {o.zipf:g} | {o.setting} | {o.before:.2f} | {o.after:.2f} | {o.worst_late:.2f} "
            f"| {o.settled_at} | {o.rerouted_fraction:.3f} / {o.rerouted_fraction_worst_layer:.3f}"
            f" / {o.rerouted_peak:.3f} | {o.lost_weight_per_token:.4f} | {least} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moe-ep gating-sim", description=__doc__.splitlines()[0])
    ap.add_argument("--zipf", default="0.5,1.0,1.5", help="comma-separated Zipf exponents")
    ap.add_argument("--experts", type=int, default=Layout.experts)
    ap.add_argument("--ranks", type=int, default=Layout.ranks)
    ap.add_argument("--slots-per-rank", type=int, default=Layout.slots_per_rank)
    ap.add_argument("--top-k", type=int, default=Layout.top_k)
    ap.add_argument("--layers", type=int, default=Layout.layers)
    ap.add_argument("--evaluations", type=int, default=20, help="planner calls after the first")
    ap.add_argument("--tokens", type=int, default=20_000, help="tokens per layer and evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, help="damped rule's rate (default: the operator's)")
    ap.add_argument("--damping", type=float, help="damped rule's damping (default: the operator's)")
    ap.add_argument(
        "--router",
        choices=("softmax", "sigmoid"),
        default="softmax",
        help="the model's router: softmax (Mixtral, Qwen) or sigmoid (GLM-4.5, DeepSeek-V3)",
    )
    ap.add_argument(
        "--model-bias",
        type=float,
        default=0.0,
        help="sigmoid: scale of the checkpoint's own correction bias, lifting cold experts",
    )
    ap.add_argument("--groups", type=int, default=1, help="sigmoid: expert groups (n_group)")
    ap.add_argument(
        "--topk-groups", type=int, default=1, help="sigmoid: groups chosen from (topk_group)"
    )
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return ap


def model_router(args: argparse.Namespace, layout: Layout) -> ModelRouter:
    """The model's router of the arguments; ValueError naming the flag at fault."""
    router = ModelRouter(args.router, args.model_bias, args.groups, args.topk_groups)
    if router.scoring == "softmax" and (router.model_bias or router.groups != 1):
        raise ValueError("--model-bias and --groups need --router sigmoid")
    per_group, remainder = divmod(layout.experts, max(router.groups, 1))
    if router.groups < 1 or remainder or (router.groups > 1 and per_group < 2):
        raise ValueError(f"--groups {router.groups} must split {layout.experts} experts evenly")
    if not 1 <= router.topk_groups <= router.groups:
        raise ValueError(f"--topk-groups must be between 1 and --groups {router.groups}")
    if router.topk_groups * per_group <= layout.top_k:
        raise ValueError("--topk-groups x experts per group must exceed --top-k")
    return router


def main(argv: list[str] | None = None) -> int:
    """Entry point of `moe-ep gating-sim`; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        import torch  # noqa: F401  (the worker's router)
    except ImportError:
        print("moe-ep gating-sim: needs torch (pip install -e '.[worker]')", file=sys.stderr)
        return 2
    try:
        zipfs = [float(x) for x in args.zipf.split(",") if x.strip()]
        layout = Layout(args.experts, args.ranks, args.slots_per_rank, args.top_k, args.layers)
        if not (1 <= layout.top_k < layout.experts <= layout.ranks * layout.slots_per_rank):
            raise ValueError(
                "need 1 <= top-k < experts <= ranks x slots-per-rank, got "
                f"top-k {layout.top_k}, experts {layout.experts}, ranks {layout.ranks}, "
                f"slots-per-rank {layout.slots_per_rank}"
            )
        if args.evaluations < 1 or args.tokens < 1 or args.layers < 1:
            raise ValueError("evaluations, tokens and layers must be >= 1")
        settings = default_settings(layout, args.rate, args.damping)
        router = model_router(args, layout)
    except ValueError as error:
        print(f"moe-ep gating-sim: {error}", file=sys.stderr)
        return 2
    outcomes = run(
        zipfs,
        layout,
        evaluations=args.evaluations,
        tokens=args.tokens,
        seed=args.seed,
        settings=settings,
        router=router,
    )
    if args.json:
        document = {
            "layout": asdict(layout),
            "router": asdict(router),
            "evaluations": args.evaluations,
            "tokens": args.tokens,
            "seed": args.seed,
            "results": [asdict(o) for o in outcomes],
        }
        print(json.dumps(document, indent=2))
    else:
        print(table(outcomes, args.evaluations))
    return 0


if __name__ == "__main__":
    sys.exit(main())
