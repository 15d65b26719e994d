#!/usr/bin/env bash
# Provide kube-apiserver, kube-controller-manager, kube-scheduler (v1.20.2) and etcd in a cache dir.
#
# Sources, in order:
#   (a) $KUBEBUILDER_ASSETS or PATH, when they hold the binary (envtest convention): symlinked;
#   (b) otherwise built from Debian bookworm's `kubernetes` source package with Debian's Go, and
#       etcd from Debian's etcd-server. See DESIGN.md, "Facts about the local control plane".
# Idempotent: binaries already in the cache are kept. Prints the bin dir on the last line.
set -euo pipefail

K8S_VERSION=v1.20.2
CACHE_ROOT="${MOE_EP_CACHE:-$HOME/.cache/moe-ep}"
BIN_DIR="$CACHE_ROOT/k8s-$K8S_VERSION/bin"
COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler)
APT_PACKAGES=(golang-go etcd-server rsync jq golang-github-modern-go-reflect2-dev openssl dpkg-dev)

log() { echo "[build-kubernetes] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$BIN_DIR"

# Find a binary in $KUBEBUILDER_ASSETS, then PATH. Kubernetes components must report v1.20.x:
# the cache directory name promises that version.
find_existing() {
    local name="$1" candidate=""
    if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/$name" ]]; then
        candidate="$KUBEBUILDER_ASSETS/$name"
    elif candidate="$(command -v "$name" 2>/dev/null)"; then
        :
    else
        return 1
    fi
    if [[ "$name" == kube-* ]] && ! "$candidate" --version 2>/dev/null | grep -q 'v1\.20\.'; then
        log "ignoring $candidate: not v1.20.x"
        return 1
    fi
    echo "$candidate"
}

missing() {
    local name
    for name in "${COMPONENTS[@]}" etcd; do
        [[ -x "$BIN_DIR/$name" ]] || echo "$name"
    done
}

for name in $(missing); do
    if existing="$(find_existing "$name")"; then
        log "using $existing"
        ln -sf "$existing" "$BIN_DIR/$name"
    fi
done

if [[ -z "$(missing)" ]]; then
    log "all binaries present in $BIN_DIR"
    echo "$BIN_DIR"
    exit 0
fi

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || die "need root (or sudo) to install Debian packages"
    SUDO="sudo"
fi

ensure_apt() {
    local pkg need=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    local src_list=/etc/apt/sources.list.d/moe-ep-src.sources
    if [[ ! -f "$src_list" ]]; then
        log "adding deb-src entry for bookworm main ($src_list)"
        $SUDO tee "$src_list" >/dev/null <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        $SUDO apt-get update -qq
    elif ! apt-cache showsrc kubernetes >/dev/null 2>&1; then
        $SUDO apt-get update -qq
    fi
    if ((${#need[@]})); then
        log "apt-get install ${need[*]}"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
}

ensure_apt

if [[ ! -x "$BIN_DIR/etcd" ]]; then
    [[ -x /usr/bin/etcd ]] || die "/usr/bin/etcd missing after installing etcd-server"
    ln -sf /usr/bin/etcd "$BIN_DIR/etcd"
fi

need_build=()
for name in "${COMPONENTS[@]}"; do
    [[ -x "$BIN_DIR/$name" ]] || need_build+=("$name")
done
if ((${#need_build[@]} == 0)); then
    echo "$BIN_DIR"
    exit 0
fi

src_version="$(apt-cache showsrc kubernetes | awk '/^Version:/ {print $2; exit}')"
log "Debian kubernetes source version: $src_version"
# Debian's bookworm package is 1.20.5+really1.20.2; anything else is not what we pinned.
[[ "$src_version" == *1.20.* ]] || die "Debian serves kubernetes $src_version, expected 1.20.x; stopping"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/moe-ep-k8s-build.XXXXXX")"
# The Go build cache is ~1.3 GB; keep it inside WORK so one rm removes everything.
cleanup() { chmod -R u+w "$WORK" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

log "apt-get source kubernetes in $WORK"
(cd "$WORK" && apt-get source -qq kubernetes >/dev/null 2>&1) || die "apt-get source kubernetes failed"
src_dir="$(find "$WORK" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -n1)"
[[ -n "$src_dir" ]] || die "no unpacked kubernetes source in $WORK"

# k8s 1.20 builds in GOPATH mode; module mode with -mod=vendor fails on Go 1.19.
export GOPATH="$WORK/gopath" GOCACHE="$WORK/gocache" GO111MODULE=off GOFLAGS="" CGO_ENABLED=0
mkdir -p "$GOPATH/src/k8s.io"
ln -s "$src_dir" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"

# Must-fix: vendored reflect2 1.0.1 crashes the apiserver (fatal error: fault in mapiterinit) on
# Go 1.19+; Debian's 1.0.2 is API-compatible.
log "replacing vendored reflect2 with Debian's"
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2

log "$(go version)"
log "make gen_openapi"
start=$SECONDS
make gen_openapi >"$WORK/gen_openapi.log" 2>&1 || { tail -n 30 "$WORK/gen_openapi.log" >&2; die "make gen_openapi failed"; }
log "gen_openapi done in $((SECONDS - start)) s"

# Same version variables as upstream's hack/lib/version.sh: component-base serves --version, while
# /version (what kubectl shows) comes from the aggregator, which reads client-go's copy.
ldflags="-s -w"
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
for pkg in k8s.io/kubernetes/vendor/k8s.io/{component-base/version,client-go/pkg/version}; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=20"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

stage="$WORK/out"
mkdir -p "$stage"
for name in "${need_build[@]}"; do
    log "go build $name"
    start=$SECONDS
    go build -o "$stage/$name" -ldflags "$ldflags" "k8s.io/kubernetes/cmd/$name"
    log "$name built in $((SECONDS - start)) s"
    # Move into place only when complete so an interrupted build never leaves a half binary.
    mv "$stage/$name" "$BIN_DIR/$name"
done

cd /
log "done: $BIN_DIR"
echo "$BIN_DIR"
