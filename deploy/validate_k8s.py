#!/usr/bin/env python3
"""Validate Kubernetes manifests (e.g. `kubectl kustomize` output) offline, strictly.

    kubectl kustomize deploy/k8s/overlays/dev | python deploy/validate_k8s.py -
    python deploy/validate_k8s.py built.yaml [--kubernetes-version 1.30]

Built-in kinds are checked by kubernetes-validate against the Kubernetes OpenAPI schemas of the given
version, in strict mode (an unknown field is an error, as `kubectl apply` rejects it). The
prometheus-operator kinds (ServiceMonitor, PrometheusRule, ...) are checked against JSON schemas
derived from the pydantic models that cloudcoil-models-prometheus-operator generates from the
operator's CRDs, made strict the same way. A kind with no schema is an error, not a skip.
Prints one line per object; exits 1 if any is invalid.
"""

from __future__ import annotations

import argparse
import sys
from functools import cache
from pathlib import Path

import jsonschema
import yaml

MONITORING_GROUP = "monitoring.coreos.com"


def _strict(node):
    """additionalProperties: false on every object schema that lists its properties (in place)."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)
    return node


@cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.Validator:
    from cloudcoil.models import prometheus_operator

    version = api_version.split("/", 1)[1]
    module = getattr(prometheus_operator, version, None)
    if module is None:
        import importlib

        module = importlib.import_module(f"cloudcoil.models.prometheus_operator.{version}")
    model = getattr(module, kind, None)
    if model is None:
        raise LookupError(f"no schema for {api_version} {kind}")
    schema = _strict(model.model_json_schema(by_alias=True))
    return jsonschema.Draft202012Validator(schema)


def _describe(error: jsonschema.ValidationError) -> str:
    """Path and message of the innermost cause (an anyOf failure names the branch that came closest)."""
    while error.context:  # the deepest sub-error is the one inside the branch that matched best
        error = max(error.context, key=lambda e: len(e.absolute_path))
    message = error.message if len(error.message) <= 300 else error.message[:300] + "..."
    return f"{'/'.join(map(str, error.absolute_path)) or '(root)'}: {message}"


def validate(doc: dict, kubernetes_version: str) -> list[str]:
    """Error messages for one object (empty when valid)."""
    api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    if api_version.startswith(MONITORING_GROUP + "/"):
        try:
            validator = _crd_validator(api_version, kind)
        except (LookupError, ImportError) as e:
            return [str(e)]
        return [_describe(e) for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [_describe(e)]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def main() -> None:
    p = argparse.ArgumentParser(
        prog="validate_k8s.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("files", nargs="+", help="YAML files ('-' for standard input)")
    p.add_argument("--kubernetes-version", default="1.30", help="Kubernetes API version to check against")
    args = p.parse_args()
    failed = count = 0
    for name in args.files:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
            docs = [d for d in yaml.safe_load_all(text) if d]
        except (OSError, yaml.YAMLError) as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            sys.exit(2)
        for doc in docs:
            count += 1
            ident = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            errors = validate(doc, args.kubernetes_version)
            if errors:
                failed += 1
                print(f"INVALID {ident}:")
                for err in errors:
                    print(f"  {err}")
            else:
                print(f"valid   {ident} ({doc.get('apiVersion')})")
    if count == 0:
        print("error: no Kubernetes objects in the input", file=sys.stderr)
        sys.exit(2)
    print(f"{count - failed} of {count} objects valid")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
