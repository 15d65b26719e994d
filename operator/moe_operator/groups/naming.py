"""Names and labels of replica groups (pure).

Group 0 keeps the names a single-group deployment always had (StatefulSet and PodDisruptionBudget
`<name>`, pods `<name>-<rank>`), so an operator upgrade finds an existing deployment's objects as
its group 0 and leaves them serving. Group k >= 1 is `<name>-g<k>` (pods `<name>-g<k>-<rank>`).
Every group shares the headless Service `<name>-workers`, the plan ConfigMap and the token.

The operator labels every worker pod with its group, and each group's leader (rank 0, which serves
the API) with a role and whether it takes traffic: the router and `<name>-api` select leaders of
groups that take traffic, so a group being drained leaves them by a label, before it goes.
"""

from __future__ import annotations

import re

DEPLOYMENT_LABEL = "moe-ep.io/deployment"
GROUP_LABEL = "moe-ep.io/group"
ROLE_LABEL = "moe-ep.io/role"
LEADER_ROLE = "leader"
TRAFFIC_LABEL = "moe-ep.io/traffic"
TRAFFIC_ON, TRAFFIC_OFF = "on", "off"
DRAIN_ANNOTATION = "moe-ep.io/drain"
"""On a group's StatefulSet while it drains: `<purpose> <since, seconds since the epoch>`;
purpose `remove` (the group goes) or `restart` (restarted in place on the new template)."""


def group_name(name: str, index: int) -> str:
    """The StatefulSet (and PodDisruptionBudget) of group `index`."""
    return name if index == 0 else f"{name}-g{index}"


def group_index(name: str, statefulset_name: str) -> int | None:
    """The group a StatefulSet of deployment `name` is, or None when it is none of its groups."""
    if statefulset_name == name:
        return 0
    match = re.fullmatch(re.escape(name) + r"-g([1-9][0-9]*)", statefulset_name)
    return int(match.group(1)) if match else None


def leader_pod(name: str, index: int) -> str:
    """The group's pod 0, which holds rank 0 (the leader and its API)."""
    return f"{group_name(name, index)}-0"


def pod_labels(index: int, *, leader: bool, traffic: bool) -> dict[str, str | None]:
    """The labels the operator keeps on a pod of group `index` (None removes one)."""
    labels: dict[str, str | None] = {GROUP_LABEL: str(index), ROLE_LABEL: None, TRAFFIC_LABEL: None}
    if leader:
        labels[ROLE_LABEL] = LEADER_ROLE
        labels[TRAFFIC_LABEL] = TRAFFIC_ON if traffic else TRAFFIC_OFF
    return labels


def serving_leaders(name: str) -> dict[str, str]:
    """The labels of leaders that take traffic: the router's selector and `<name>-api`'s."""
    return {DEPLOYMENT_LABEL: name, ROLE_LABEL: LEADER_ROLE, TRAFFIC_LABEL: TRAFFIC_ON}


def leaders_selector(name: str) -> str:
    """The scale subresource's selector (status.labelSelector): every group's leader, one pod
    per group, so an HPA's Pods metric (a leader's queue, `moe_requests_waiting`) averages
    per group."""
    labels = {DEPLOYMENT_LABEL: name, ROLE_LABEL: LEADER_ROLE}
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))
