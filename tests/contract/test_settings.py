"""The contract's table of worker settings is the one place a setting is declared: every row
reaches the worker's fields and environment parser, the flags of `moe-worker serve`, the flags a
MoEDeployment may pass, the operator's pod environment and the MoEDeployment's defaults, and
docs/worker.md shows the table as it is."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from moe_contract import settings as table
from moe_contract.settings import OPERATOR, USER, WORKER_SETTINGS, Setting, boolean
from moe_operator.api import MoEDeploymentSpec
from moe_operator.manifests import children
from moe_operator.validation import extra_args_problems
from moe_worker.main import FlagRefused, build_parser, check_pod_flags, serve_settings
from moe_worker.settings import (
    TrafficSettings,
    WorkerSettings,
    field_name,
    settings_from_env,
    settings_to_env,
)

DOCS = Path(__file__).parents[2] / "docs" / "worker.md"
NOT_SETTINGS = {"rank", "model", "declared_shape", "traffic"}
"""WorkerSettings fields that are no row of the table (identity, shape, the traffic's own)."""


def value_of(settings: WorkerSettings, setting: Setting) -> Any:
    owner = settings.traffic if setting.name.startswith("traffic.") else settings
    return getattr(owner, field_name(setting))


def other_text(setting: Setting) -> str:
    """A value of the setting's type that is not its default, as text."""
    if setting.parse is boolean:
        return "false" if setting.default else "true"
    if setting.parse is int:
        return str((setting.default or 0) + 3)
    if setting.parse is float:
        return str((setting.default or 0.0) + 2.5)
    return "some-value"


def test_every_row_is_a_field_with_the_tables_default_and_every_field_a_row() -> None:
    fields = {f.name for f in dataclasses.fields(WorkerSettings)} - NOT_SETTINGS
    traffic = {f"traffic.{f.name}" for f in dataclasses.fields(TrafficSettings)}
    assert fields | traffic == set(table.SETTINGS)
    defaults = WorkerSettings()
    for setting in WORKER_SETTINGS:
        assert value_of(defaults, setting) == setting.default, setting.name


@pytest.mark.parametrize("setting", WORKER_SETTINGS, ids=lambda s: s.name)
def test_each_variable_sets_its_field_and_travels_back(setting: Setting) -> None:
    text = other_text(setting)
    parsed = settings_from_env({setting.variable: text})
    assert value_of(parsed, setting) == setting.parse(text)
    assert settings_to_env(parsed)[setting.variable] == str(setting.parse(text))
    if setting.parse is not str:
        with pytest.raises(ValueError, match=setting.variable):
            settings_from_env({setting.variable: "not-a-value"})


@pytest.mark.parametrize("setting", [s for s in WORKER_SETTINGS if s.flags], ids=lambda s: s.name)
def test_each_flag_overrides_its_variable(setting: Setting) -> None:
    parser = build_parser()
    text = other_text(setting)
    environ = {} if setting.default is None else {setting.variable: str(setting.default)}
    for flag in setting.flags:
        args = parser.parse_args(["serve", flag, text])
        assert value_of(serve_settings(args, environ), setting) == setting.parse(text)


@pytest.mark.parametrize("setting", [s for s in WORKER_SETTINGS if s.bounds], ids=lambda s: s.name)
def test_the_worker_and_the_operator_refuse_the_same_out_of_bounds_values(
    setting: Setting, capsys: pytest.CaptureFixture[str]
) -> None:
    """One reader (`Setting.read`): what the operator admits, a worker in a pod accepts."""
    bounds = setting.bounds
    assert bounds is not None and bounds.low is not None
    outside = [str(bounds.low - 1), "nan", "abc"] + ([str(bounds.low)] if bounds.above else [])
    for text in outside:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", setting.flags[0], text])
        said = capsys.readouterr().err
        assert f"argument {setting.flags[0]}" in said and repr(text) in said, said
        with pytest.raises(ValueError, match=setting.variable):
            settings_from_env({setting.variable: text})
        if setting.pod == USER:
            (problem,) = extra_args_problems([setting.flags[0], text])
            assert problem.message.startswith(f"{setting.flags[0]} {text!r}")
    inside = str(bounds.low + 1)
    build_parser().parse_args(["serve", setting.flags[0], inside])
    assert not extra_args_problems([setting.flags[0], inside])


def test_serve_help_describes_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for setting in WORKER_SETTINGS:
        if setting.flags:
            described = f"{' '.join(setting.help.split())} [{setting.variable}; default"
            assert described in text, setting.name


def test_users_may_pass_exactly_the_user_rows_flags() -> None:
    parser = build_parser()
    pod = {"MOE_POD_NAME": "demo-worker-0"}
    for setting in WORKER_SETTINGS:
        if not setting.flags:
            continue
        flag, text = setting.flags[0], other_text(setting)
        operator_refuses = extra_args_problems([flag, text])
        args = parser.parse_args(["serve", flag, text])
        if setting.pod == USER:
            assert not operator_refuses, flag
            check_pod_flags(args, pod)  # accepted by a worker in a pod
        else:
            assert operator_refuses and "not a flag users may set" in operator_refuses[0].message
            with pytest.raises(FlagRefused, match=setting.variable):
                check_pod_flags(args, pod)


def spec_with_everything() -> MoEDeploymentSpec:
    """A MoEDeployment whose pods get every setting the operator may set (a checkpoint, keys)."""
    return MoEDeploymentSpec.model_validate(
        {
            "model": {
                "source": {
                    "type": "Checkpoint",
                    "checkpoint": {"volume": {"persistentVolumeClaim": {"claimName": "models"}}},
                }
            },
            "worker": {"apiKeys": {"secretName": "keys"}},
        }
    )


def pod_env(spec: MoEDeploymentSpec) -> dict[str, str]:
    statefulset = children.build_statefulset("m", "ml", spec)
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", "<ref>") for item in container["env"]}


def test_the_operator_sets_exactly_the_operator_rows() -> None:
    env = pod_env(spec_with_everything())
    for setting in WORKER_SETTINGS:
        assert (setting.variable in env) == (setting.pod == OPERATOR), setting.name
    plain = pod_env(MoEDeploymentSpec())  # synthetic weights, an open API
    assert table.SETTINGS["checkpoint"].variable not in plain
    assert table.SETTINGS["api_keys_path"].variable not in plain


def test_pods_list_their_environment_as_they_always_have() -> None:
    """Deriving the environment from the table changed no pod template (a changed template
    restarts the whole group): the order of the variables is the one pods had before it."""
    assert list(pod_env(spec_with_everything())) == [
        "MOE_POD_NAME",
        *("MOE_WORLD_SIZE", "MOE_RANKS_PER_POD", "MOE_MASTER_ADDR", "MOE_MASTER_PORT"),
        *("MOE_BACKEND", "MOE_DEVICE"),
        *("MOE_EXPERT_PARALLEL", "MOE_TENSOR_PARALLEL", "MOE_PIPELINE_PARALLEL"),
        *("MOE_ARCHITECTURE", "MOE_LAYERS", "MOE_EXPERTS_PER_LAYER", "MOE_HIDDEN_SIZE"),
        *("MOE_FFN_HIDDEN_SIZE", "MOE_ATTENTION_HEADS", "MOE_KV_HEADS", "MOE_HEAD_DIM"),
        *("MOE_TOP_K", "MOE_DTYPE", "MOE_VOCAB_SIZE"),
        *("MOE_SLOTS_PER_RANK", "MOE_MAX_SLOTS_PER_RANK", "MOE_PLAN_PATH", "MOE_TOKEN_PATH"),
        *("MOE_HTTP_PORT", "MOE_API_PORT", "MOE_SERVED_MODEL_NAME", "MOE_KV_CACHE_TOKENS"),
        *("MOE_MAX_BATCH_TOKENS", "MOE_MAX_QUEUED_REQUESTS", "MOE_STALL_TIMEOUT"),
        *("MOE_COLLECTIVE_TIMEOUT", "MOE_TERMINATION_MESSAGE_PATH", "MOE_CHECKPOINT"),
        "MOE_API_KEYS_PATH",
        # Added since (issue 19): a pod's template changed once for them.
        "MOE_POD_IP",
    ]


def test_each_deployment_default_reaches_the_worker_as_its_runtime_twin() -> None:
    """The MoEDeployment's defaults, through the pod environment the operator renders, are the
    worker's own defaults, except where the table names the MoEDeployment's own."""
    spec = MoEDeploymentSpec()
    served = settings_from_env({**pod_env(spec), "MOE_POD_NAME": "m-0"})  # the downward API's
    for setting in WORKER_SETTINGS:
        if setting.spec is None:
            continue
        field_default = _field(spec, setting.spec)
        assert field_default == setting.deployment_default, setting.name
        assert value_of(served, setting) == setting.parse(str(field_default)), setting.name
        if setting.spec_default is None:
            assert value_of(served, setting) == setting.default, setting.name


def _field(spec: MoEDeploymentSpec, path: str) -> Any:
    value: Any = spec
    for part in path.split("."):
        value = getattr(value, part)
    return value


def test_docs_show_the_table_as_it_is() -> None:
    assert table.markdown() in DOCS.read_text(), (
        "docs/worker.md's settings table differs from moe_contract.settings: "
        "paste `python -m moe_contract.settings` there"
    )
