#!/usr/bin/env bash
# System packages the tests and the local demo need, from Debian's registry only:
# Prometheus (server + promtool) for alert-rule tests and the demo, kubectl when the machine has
# none (Debian's kubernetes-client matches our v1.20.2 control plane), and openssl for its certs.
# Then the control plane binaries themselves (built once per machine, cached).
set -euo pipefail
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v kubectl >/dev/null || need+=(kubernetes-client)
command -v openssl >/dev/null || need+=(openssl)
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "install-system-deps: need root to apt-get install ${need[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian starts a prometheus service on install; ours are started by the tests and the demo.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi
bash "$(dirname "$0")/../local/moe_local/build-kubernetes.sh"
