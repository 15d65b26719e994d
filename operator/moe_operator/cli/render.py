"""`moe-ep render -f deployment.yaml`: print the objects the operator would create, to review.

    moe-ep render -f deployment.yaml [--namespace NS] [--kubernetes-version 1.30]

No cluster is contacted. Each MoEDeployment in the file is validated as the operator validates it
(the same messages, naming the field and the fix; exit 2 on any problem) and built by the
operator's own pure builders: the control-token Secret (without its value: the operator
generates it), the plan ConfigMap (the round-robin plan a new deployment starts from), the two
Services, the StatefulSet and the PodDisruptionBudget (policy/v1, or policy/v1beta1 for
--kubernetes-version below 1.21). A worker image left empty is the operator's default for the
device; a chart installation may set another (values workerImage). The operator adds the owner
reference to the MoEDeployment when it creates them; the output has none.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import yaml

from moe_contract import env as worker_env
from moe_operator import api
from moe_operator.api import MoEDeploymentSpec
from moe_operator.images import WorkerImages, with_worker_image
from moe_operator.manifests import children, podspec
from moe_operator.planning.ledger import Ledger
from moe_operator.planning.record import choose_plan
from moe_operator.validation import parse_spec

DEFAULT_KUBERNETES_VERSION = "1.30"
EXIT_INVALID = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="moe-ep render",
        description="Print the objects the operator would create for a MoEDeployment.",
    )
    parser.add_argument(
        "-f", "--filename", required=True, help="MoEDeployment YAML file ('-': standard input)"
    )
    parser.add_argument(
        "-n",
        "--namespace",
        default="",
        help="namespace of objects whose file names none (default: 'default')",
    )
    parser.add_argument(
        "--kubernetes-version",
        default=DEFAULT_KUBERNETES_VERSION,
        help="the cluster's Kubernetes version; picks the PodDisruptionBudget apiVersion "
        f"(default {DEFAULT_KUBERNETES_VERSION})",
    )
    return parser.parse_args(argv)


def render_deployment(
    document: dict[str, Any],
    namespace: str,
    pdb_api_version: str,
    images: WorkerImages,
) -> tuple[list[dict[str, Any]], list[str]]:
    """(the children in the order the operator creates them, problems); no objects when there
    is any problem."""
    metadata = document.get("metadata") or {}
    name = str(metadata.get("name") or "")
    namespace = str(metadata.get("namespace") or namespace)
    spec, problems = parse_spec(document.get("spec") or {}, name)
    if spec is None:
        return [], [str(problem) for problem in problems]
    spec = with_worker_image(spec, images)
    objects = build_children(name, namespace, spec, pdb_api_version)
    for obj in objects:  # what kopf.adopt adds at the boundary, less the owner reference
        obj["metadata"] = {
            "name": obj["metadata"]["name"],
            "namespace": namespace,
            **obj["metadata"],
        }
    return objects, []


def build_children(
    name: str, namespace: str, spec: MoEDeploymentSpec, pdb_api_version: str
) -> list[dict[str, Any]]:
    """The operator's children of a new deployment, from its builders (reconcile.ensure_children
    creates these, in this order)."""
    shape = children.plan_shape(spec)
    first = choose_plan(shape, None, None, Ledger(), lambda: None).plan
    notes = {children.PLAN_VERSION_ANNOTATION: str(first.version)}
    secret = children.build_token_secret(name, token="unused")
    del secret["stringData"]  # the operator generates the token; never print one
    built = [
        secret,
        children.build_plan_configmap(name, {shape.key: first}, notes),
        children.build_service(name, spec),
        children.build_api_service(name, spec),
        children.build_statefulset(name, namespace, spec),
        children.build_pdb(name, spec, pdb_api_version),
    ]
    return [_without_nulls(obj) for obj in built]


def _without_nulls(node: Any) -> Any:
    """A null in a builder's output clears a field in the operator's merge patch (the
    StatefulSet's rollingUpdate); an object created new simply has no such field."""
    if isinstance(node, dict):
        return {key: _without_nulls(value) for key, value in node.items() if value is not None}
    if isinstance(node, list):
        return [_without_nulls(item) for item in node]
    return node


def _documents(path: str) -> Iterator[dict[str, Any]]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    for document in yaml.safe_load_all(text):
        if document:
            yield document


def _comment(obj: dict[str, Any]) -> str:
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind == "Secret":
        return (
            f"# Secret {name}: the workers' control token. Its value (stringData."
            f"{worker_env.TOKEN_FILE_NAME}) is generated by the operator when it creates the "
            "Secret and is not shown here.\n"
        )
    if kind == "StatefulSet":
        problems = podspec.restricted_problems(obj["spec"]["template"]["spec"])
        if not problems:
            return "# Pod Security: the worker pods pass the restricted profile.\n"
        return "# Pod Security: outside the restricted profile: " + "; ".join(problems) + "\n"
    return ""


def write(objects: list[dict[str, Any]], out: TextIO, source: str) -> None:
    for obj in objects:
        out.write(f"---\n# {obj['kind']} {obj['metadata']['name']}, from {source}\n")
        out.write(_comment(obj))
        out.write(yaml.safe_dump(obj, sort_keys=False, width=100))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        pdb_api_version = podspec.pdb_api_version_for(args.kubernetes_version)
        documents = list(_documents(args.filename))
    except (OSError, ValueError, yaml.YAMLError) as error:
        sys.stderr.write(f"moe-ep render: {error}\n")
        return EXIT_INVALID
    images = WorkerImages.from_environ()
    failed = False
    rendered = 0
    for document in documents:
        if document.get("kind") != api.KIND:
            sys.stderr.write(
                f"moe-ep render: {args.filename}: skipping {document.get('kind')!r} "
                f"(only {api.KIND} objects are rendered)\n"
            )
            continue
        name = (document.get("metadata") or {}).get("name") or ""
        objects, problems = render_deployment(
            document, args.namespace or "default", pdb_api_version, images
        )
        for problem in problems:
            sys.stderr.write(f"{args.filename}: {api.KIND} {name}: {problem}\n")
        failed = failed or bool(problems)
        rendered += bool(objects)
        write(objects, sys.stdout, f"{api.KIND} {name}")
    if not rendered and not failed:
        sys.stderr.write(f"moe-ep render: {args.filename} holds no {api.KIND}\n")
        return EXIT_INVALID
    return EXIT_INVALID if failed else 0
