"""Kubernetes' own rules for names, labels, environment variables and quantities.

Pure, stdlib only. The API server applies these to the children the operator builds; a spec
that breaks one is accepted as a MoEDeployment (the CRD schema cannot say it on 1.20) and then
fails where nobody looks (a StatefulSet whose pods are never created, a status that says
Deploying forever). `validation` checks them first and names the field instead. The rules follow
apimachinery's `validation` package as of Kubernetes 1.20; `tests/integration` checks samples of
them against the real API server.
"""

from __future__ import annotations

import re
from fractions import Fraction

DNS_LABEL_MAX = 63
DNS_SUBDOMAIN_MAX = 253
LABEL_VALUE_MAX = 63

_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NAME_PART = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_QUANTITY = re.compile(
    r"(?P<sign>[+-]?)(?P<number>\d+\.?\d*|\.\d+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?"
)
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
STANDARD_CONTAINER_RESOURCES = ("cpu", "memory", "ephemeral-storage")


def dns1035_label(value: str) -> str | None:
    """Service names: lowercase alphanumerics and '-', starting with a letter; <= 63."""
    if len(value) > DNS_LABEL_MAX:
        return f"must be at most {DNS_LABEL_MAX} characters"
    if not _DNS1035_LABEL.fullmatch(value):
        return (
            "must consist of lowercase letters, digits and '-', start with a letter and end "
            "with a letter or digit"
        )
    return None


def dns1123_subdomain(value: str) -> str | None:
    """Most object names and label-key prefixes: dot-separated DNS labels; <= 253."""
    if len(value) > DNS_SUBDOMAIN_MAX:
        return f"must be at most {DNS_SUBDOMAIN_MAX} characters"
    if not all(_DNS1123_LABEL.fullmatch(part) for part in value.split(".")):
        return "must be lowercase DNS labels (letters, digits, '-') separated by '.'"
    return None


def qualified_name(value: str) -> str | None:
    """Label and annotation keys, taint keys, resource names: `[prefix/]name`."""
    prefix, slash, name = value.rpartition("/")
    if slash and (not prefix or dns1123_subdomain(prefix)):
        return f"prefix {prefix!r} must be a DNS subdomain (e.g. example.com)"
    if not name or len(name) > DNS_LABEL_MAX or not _NAME_PART.fullmatch(name):
        return (
            f"name part {name!r} must be 1-{DNS_LABEL_MAX} letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def label_value(value: str) -> str | None:
    """Label values and taint values: empty, or a name part of at most 63 characters."""
    if value and (len(value) > LABEL_VALUE_MAX or not _NAME_PART.fullmatch(value)):
        return (
            f"must be empty or 1-{LABEL_VALUE_MAX} letters, digits, '-', '_' or '.', starting "
            "and ending with a letter or digit"
        )
    return None


def env_name(value: str) -> str | None:
    """Environment variable names: letters, digits, '_', '-' and '.', not starting with a digit."""
    if not _ENV_NAME.fullmatch(value):
        return "must consist of letters, digits, '_', '-' or '.', and not start with a digit"
    return None


def config_key(value: str) -> str | None:
    """Keys of a ConfigMap or Secret (and the file names they become): letters, digits, '-',
    '_' and '.'; <= 253; not '.' or '..'."""
    if len(value) > DNS_SUBDOMAIN_MAX:
        return f"must be at most {DNS_SUBDOMAIN_MAX} characters"
    if not _CONFIG_KEY.fullmatch(value) or value in (".", ".."):
        return "must consist of letters, digits, '-', '_' or '.' (and not be '.' or '..')"
    return None


def parse_quantity(value: str) -> Fraction:
    """A resource quantity ('100m', '64Gi', '1.5', '2e3') as an exact number.

    Raises ValueError for anything the API server would not parse.
    """
    match = _QUANTITY.fullmatch(value.strip()) if value == value.strip() else None
    if match is None:
        raise ValueError(
            f"{value!r} is not a quantity: a number with an optional suffix "
            "(m, k, M, G, Ki, Mi, Gi, ... or an exponent e3), e.g. 500m, 64Gi"
        )
    number = Fraction(match["number"])
    suffix = match["suffix"] or ""
    if suffix in _BINARY:
        number *= 1024 ** _BINARY[suffix]
    elif suffix in _DECIMAL:
        number *= Fraction(10) ** _DECIMAL[suffix]
    else:
        number *= Fraction(10) ** int(suffix[1:])
    return -number if match["sign"] == "-" else number


def container_resource_name(value: str) -> str | None:
    """A container's requests/limits key: cpu, memory, ephemeral-storage, hugepages-<size>, or
    a domain-prefixed extended resource (e.g. nvidia.com/gpu)."""
    if "/" not in value:
        if value in STANDARD_CONTAINER_RESOURCES or value.startswith("hugepages-"):
            return None
        return (
            f"must be one of {', '.join(STANDARD_CONTAINER_RESOURCES)}, hugepages-<size>, or "
            "an extended resource with a domain (e.g. example.com/foo)"
        )
    return qualified_name(value)


def is_extended_resource(value: str) -> bool:
    """Extended resources (whole numbers, request equal to limit): prefixed, not kubernetes.io."""
    prefix = value.partition("/")[0]
    return "/" in value and not (prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io"))
