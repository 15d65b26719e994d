"""Kubernetes' own rules, as the operator applies them before the API server would."""

from __future__ import annotations

from fractions import Fraction

import pytest

from moe_operator import kuberules


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", 1),
        ("500m", Fraction(1, 2)),
        ("1.5", Fraction(3, 2)),
        (".5", Fraction(1, 2)),
        ("64Gi", 64 * 2**30),
        ("2e3", 2000),
        ("1E3", 1000),
        ("1E", 10**18),
        ("-1", -1),
        ("100n", Fraction(1, 10**7)),
    ],
)
def test_quantities_parse_exactly(text: str, value: Fraction) -> None:
    assert kuberules.parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "lots", "1 Gi", " 1", "1GiB", "1.2.3", "Gi", "1e", "."])
def test_what_the_api_server_would_not_parse_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a quantity"):
        kuberules.parse_quantity(text)


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("zone", True),
        ("nvidia.com/gpu.product", True),
        ("a_b.c-d", True),
        ("bad key", False),
        ("/name", False),
        ("UPPER.com/x", False),
        ("x" * 64, False),
        ("-lead", False),
    ],
)
def test_qualified_names(key: str, ok: bool) -> None:
    assert (kuberules.qualified_name(key) is None) == ok


def test_names_label_values_and_env() -> None:
    assert kuberules.dns1035_label("m1-workers") is None
    assert kuberules.dns1035_label("1m") and kuberules.dns1035_label("a.b")
    assert kuberules.dns1035_label("a" * 64)
    assert kuberules.label_value("") is None and kuberules.label_value("H100_SXM.5") is None
    assert kuberules.label_value("x" * 64) and kuberules.label_value("a b")
    for name in ("OMP_NUM_THREADS", "_x", "A-B", "a.b"):  # what the API server accepts
        assert kuberules.env_name(name) is None, name
    for name in ("1A", "", "A B", "A=B"):
        assert kuberules.env_name(name), name


def test_container_resource_names() -> None:
    for name in ("cpu", "memory", "ephemeral-storage", "hugepages-2Mi", "example.com/nic"):
        assert kuberules.container_resource_name(name) is None, name
    assert kuberules.container_resource_name("gpu")
    assert kuberules.is_extended_resource("nvidia.com/gpu")
    assert not kuberules.is_extended_resource("cpu")
    assert not kuberules.is_extended_resource("kubernetes.io/foo")


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("keys", True),
        ("api-keys.txt", True),
        ("_A.b-9", True),
        ("a/b", False),
        ("..", False),
        (".", False),
        ("", False),
        ("a b", False),
        ("k" * 254, False),
    ],
)
def test_configmap_and_secret_keys(key: str, ok: bool) -> None:
    assert (kuberules.config_key(key) is None) == ok
