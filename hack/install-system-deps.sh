#!/usr/bin/env bash
# System packages the tests and the local demo need, from Debian's registry only:
# Prometheus (server + promtool) for alert-rule tests and the demo, kubectl when the machine has
# none (Debian's kubernetes-client matches our v1.20.2 control plane), and openssl for its certs.
# buildah and mmdebstrap build the container images with no registry (hack/build_images.py).
# Then the control plane binaries themselves (built once per machine, cached).
#
#   install-system-deps.sh          everything `make test` and `make demo` need
#   install-system-deps.sh images   only what `make images` needs
set -euo pipefail
only="${1:-}"
need=()
command -v buildah >/dev/null || need+=(buildah)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ "$only" != images ]; then
  command -v promtool >/dev/null || need+=(prometheus)
  command -v kubectl >/dev/null || need+=(kubernetes-client)
  command -v openssl >/dev/null || need+=(openssl)
fi
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "install-system-deps: need root to apt-get install ${need[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ "$only" = images ] && exit 0
# Debian starts a prometheus service on install; ours are started by the tests and the demo.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi
bash "$(dirname "$0")/../local/moe_local/build-kubernetes.sh"
