#!/bin/sh
# The build steps every moe-ep image shares, run as root inside the image by images/Containerfile.*:
#
#   install.sh wheel SRC   build the moe-ep wheel from the source tree SRC into /wheels
#   install.sh operator    install /tmp/wheels/moe_ep-*.whl into the venv /opt/moe-ep (no torch)
#   install.sh worker      the same with the `worker` extra and torch $TORCH_VERSION, build
#                          $TORCH_VARIANT (cpu: from $TORCH_CPU_INDEX when set; cuda: PyPI's)
#
# then (operator, worker) add the user the image runs as. One script, so the images cannot drift
# apart on venv, user or checks; the Containerfiles hold only the image config.
# pip reads PIP_INDEX_URL, PIP_EXTRA_INDEX_URL and PIP_FIND_LINKS from the environment (the
# Containerfiles' build arguments), which is how a mirror or a local wheel directory comes in.
set -eu

VENV=/opt/moe-ep
# Fixed and numeric: Kubernetes verifies runAsNonRoot only against a numeric image user; the
# chart's runAsUser is the same number. Containerfiles: `USER 65532:65532`.
APP_UID=65532
APP_USER=moe

die() {
    echo "install.sh: $*" >&2
    exit 1
}

# Debian's python3 (3.11 on bookworm) with venv, installed only when the base lacks it: the
# mmdebstrap rootfs of `make images` and python:3.11-slim already have one.
ensure_python() {
    if python3 -c 'import ensurepip, venv' 2>/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "the base image has no python3 with venv and no apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3 python3-venv ca-certificates >/dev/null
    rm -rf /var/lib/apt/lists/*
}

the_wheel() {
    set -- /tmp/wheels/moe_ep-*.whl
    [ "$#" -eq 1 ] && [ -f "$1" ] || die "expected one moe_ep wheel in /tmp/wheels, found: $*"
    echo "$1"
}

build_wheel() {
    ensure_python
    python3 -m venv /tmp/build
    /tmp/build/bin/pip wheel -q --no-cache-dir --no-deps --wheel-dir /wheels "$1"
}

install_operator() {
    "$VENV/bin/pip" install -q --no-cache-dir "$(the_wheel)"
    # The operator never imports torch (tests/test_layering.py); its image must not carry it.
    if "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
        die "torch ended up in the operator image"
    fi
}

install_worker() {
    : "${TORCH_VERSION:?}" "${TORCH_VARIANT:?}"
    case "$TORCH_VARIANT" in
        cpu) set -- ${TORCH_CPU_INDEX:+--extra-index-url "$TORCH_CPU_INDEX"} ;;
        cuda) set -- ;;
        *) die "TORCH_VARIANT must be cpu or cuda, not $TORCH_VARIANT" ;;
    esac
    "$VENV/bin/pip" install -q --no-cache-dir "$@" "torch==$TORCH_VERSION" "$(the_wheel)[worker]"
    # PyPI's Linux torch is the CUDA build and pip takes the highest version it sees, so a wrong
    # index silently gives the other build: say so here rather than at the first forward pass.
    "$VENV/bin/python" - "$TORCH_VARIANT" <<'EOF'
import sys

import torch

have = "cuda" if torch.version.cuda else "cpu"
if have != sys.argv[1]:
    sys.exit(f"install.sh: torch {torch.__version__} is the {have} build, not {sys.argv[1]}")
print(f"torch {torch.__version__}")
EOF
}

add_user() {
    groupadd --system --gid "$APP_UID" "$APP_USER"
    useradd --system --uid "$APP_UID" --gid "$APP_UID" --home-dir "/home/$APP_USER" \
        --create-home --shell /usr/sbin/nologin "$APP_USER"
}

case "${1:-}" in
    wheel)
        build_wheel "${2:?install.sh wheel SRC}"
        ;;
    operator | worker)
        ensure_python
        python3 -m venv "$VENV"
        "install_$1"
        add_user
        ;;
    *)
        die "usage: install.sh wheel SRC | operator | worker"
        ;;
esac
