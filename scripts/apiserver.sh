#!/usr/bin/env bash
# A real Kubernetes API server for custom resources, for the tests that need one (no cluster, no root).
#
#   scripts/apiserver.sh build       downloads and builds, once, into the cache; prints the binaries' paths
#   scripts/apiserver.sh start DIR   starts etcd and the server on free ports with their data under DIR;
#                                    writes DIR/kubeconfig, DIR/env and DIR/pids; prints the kubeconfig's path
#   scripts/apiserver.sh stop DIR    stops what `start DIR` started
#   scripts/apiserver.sh fetch       only downloads and unpacks the sources; prints the GOPATH's src
#
# Each start is a fresh, empty server: DIR's earlier etcd data and certificates go. DIR/env gives
# KUBECONFIG, PARLEY_APISERVER_URL and PARLEY_ETCD_URL; the logs are DIR/apiserver.log and DIR/etcd.log.
# Several DIRs can run at once. The kubeconfig's user is a client certificate in system:masters.
#
# The server is Kubernetes' own standalone `apiextensions-apiserver` (k8s.io/apiextensions-apiserver) on etcd,
# built from Debian's packaged Go sources by scripts/apiserver/main.go. It serves apiextensions.k8s.io and
# the custom resources of the CRDs applied to it, with their schemas, validation rules, status and scale
# subresources, server-side apply, watches and discovery; it serves nothing else: ConfigMaps, Secrets,
# Deployments and the rest of the built-in API answer 404. A group ending in `.k8s.io` (leases, events) can
# be stood in by a CRD with the annotation `api-approved.kubernetes.io: "unapproved, test stand-in"`.
#
# Where KUBEBUILDER_ASSETS names a directory holding `kube-apiserver` and `etcd` (the envtest convention),
# `start` runs those instead: a full API server, with the built-in API too. Nothing is built then.
#
# How `build` gets its sources: Debian's development suite (sid) packages the Go library of
# apiextensions-apiserver with every library it needs (golang-*-dev), a Go toolchain and etcd. They are
# downloaded with apt-get under an apt state of their own in the cache (own sources list naming the same
# Debian archive as the system's apt sources, own lists, own package cache, an empty dpkg status), unpacked
# with `dpkg -x` (nothing is installed; the system's apt and dpkg are not touched), and the server is built
# in GOPATH mode, offline, with CGO off: a static binary. The first build takes 5 to 10 minutes on 2 cores
# (about 30 s of it downloading 280 MB); a rebuild after main.go changes takes seconds, from the Go build
# cache kept beside it. The cache takes about 4 GB (the unpacked sources and the Go build cache).
# etcd is Debian's binary (dynamically linked: glibc 2.34 or later).
#
# Environment:
#   PARLEY_APISERVER_CACHE   the cache (default ${XDG_CACHE_HOME:-$HOME/.cache}/parley/apiserver)
#   PARLEY_APISERVER_MIRROR  the Debian archive to download from (default: the one the system's apt uses)
#   PARLEY_APISERVER_REFRESH=1  `build` resolves the package set anew from the archive (sid moves: the set
#                            resolved first is kept, and reused, until this is asked for)
#   KUBEBUILDER_ASSETS       see above
set -euo pipefail
CALLER_PWD=$PWD
cd "$(dirname "$0")/.."
REPO=$PWD
# shellcheck source=scripts/deps.sh
source scripts/deps.sh

CACHE=${PARLEY_APISERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/parley/apiserver}
MAIN_SRC=$REPO/scripts/apiserver/main.go
SERVER_BIN=$CACHE/bin/apiextensions-apiserver
ETCD_BIN=$CACHE/bin/etcd
SUITE=sid
# The library whose transitive golang-*-dev dependencies make up the GOPATH, and the rest that is needed.
ROOT_PACKAGE=golang-k8s-apiextensions-apiserver-dev
EXTRA_PACKAGES=(golang-go etcd-server)

die() {
  log "error: $*"
  exit 1
}

# ---------------------------------------------------------------------------------------------- build

# The Debian archive the system's apt uses (deb822 or one-line sources), else Debian's own.
debian_mirror() {
  if [ -n "${PARLEY_APISERVER_MIRROR:-}" ]; then
    echo "$PARLEY_APISERVER_MIRROR"
    return
  fi
  local uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' | tr ' ' '\n' |
    grep -E '^https?://.*/debian/?$' | head -n 1 || true)
  if [ -z "$uri" ]; then
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | grep -E '^[[:space:]]*deb[[:space:]]' |
      sed -E 's/\[[^]]*\]//' | awk '{print $2}' | grep -E '^https?://.*/debian/?$' | head -n 1 || true)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

# Writes the private apt state: its own configuration file, read through APT_CONFIG, which also turns off
# /etc/apt/apt.conf.d (whose hooks would refresh the system's caches) and the system's preferences.
apt_state() {
  local state=$CACHE/apt keyring=/usr/share/keyrings/debian-archive-keyring.gpg signed_by=""
  mkdir -p "$state/lists/partial" "$state/cache/archives/partial"
  [ -e "$state/status" ] || : >"$state/status"
  [ -r "$keyring" ] && signed_by="[signed-by=$keyring] "
  echo "deb $signed_by$(debian_mirror) $SUITE main" >"$state/sources.list"
  cat >"$state/apt.conf" <<EOF
Dir::Etc::Parts "/dev/null";
Dir::Etc::Main "/dev/null";
Dir::Etc::SourceList "$state/sources.list";
Dir::Etc::SourceParts "/dev/null";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "/dev/null";
Dir::State "$state";
Dir::State::Lists "$state/lists";
Dir::State::status "$state/status";
Dir::Cache "$state/cache";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
Acquire::Check-Valid-Until "false";
APT::Sandbox::User "root";
EOF
}

papt() { APT_CONFIG=$CACHE/apt/apt.conf "$@"; }

# Resolves the package set from the archive into $CACHE/manifest: one `'URI' FILE SIZE HASH` line a package.
resolve_packages() {
  command -v apt-get >/dev/null || die "apt-get is needed to download the server's sources (Debian's packages)"
  command -v dpkg >/dev/null || die "dpkg is needed to unpack the server's sources"
  apt_state
  log "reading Debian $SUITE's package lists from $(debian_mirror) (an apt state of its own in $CACHE/apt)"
  # apt-get update exits 0 when an archive cannot be reached: whether a package list came matters.
  rm -f "$CACHE/apt/lists/"*_Packages*
  if ! papt apt-get update -qq >"$CACHE/apt/update.log" 2>&1 || ! compgen -G "$CACHE/apt/lists/*_Packages*" >/dev/null; then
    cat "$CACHE/apt/update.log" >&2
    die "could not read Debian $SUITE's package list from $(debian_mirror) (above); PARLEY_APISERVER_MIRROR names another archive"
  fi
  local packages
  packages=$(papt apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances "$ROOT_PACKAGE" "${EXTRA_PACKAGES[@]}" 2>"$CACHE/apt/depends.log" |
    grep -E '^golang-[^ ]*-dev$' | sort -u) || die "apt-cache could not resolve $ROOT_PACKAGE in $SUITE"
  # The toolchain: the Go golang-go depends on (golang-1.NN-go, with its golang-1.NN-src), and etcd.
  local go_pkg
  go_pkg=$(papt apt-cache depends golang-go | sed -n 's/^ *Depends: \(golang-1\.[0-9]*-go\)$/\1/p' | head -n 1)
  [ -n "$go_pkg" ] || die "no Go toolchain found in Debian $SUITE (golang-go's dependency)"
  packages+=$'\n'"$go_pkg"$'\n'"${go_pkg%-go}-src"$'\n'etcd-server
  # shellcheck disable=SC2086 # one word a package
  papt apt-get download --print-uris $packages >"$CACHE/manifest.new" 2>"$CACHE/apt/print-uris.log" || {
    cat "$CACHE/apt/print-uris.log" >&2
    die "apt-get could not locate every package"
  }
  mv "$CACHE/manifest.new" "$CACHE/manifest"
  log "$(wc -l <"$CACHE/manifest") packages: $ROOT_PACKAGE $(papt apt-cache show --no-all-versions "$ROOT_PACKAGE" |
    sed -n 's/^Version: //p'), $go_pkg, etcd-server"
}

# Downloads the manifest's packages that are not in $CACHE/debs yet (or are of another size).
download_packages() {
  mkdir -p "$CACHE/debs"
  local missing=() uri file size
  while read -r uri file size _; do
    [ "$(stat -c %s "$CACHE/debs/$file" 2>/dev/null)" = "$size" ] && continue
    # NAME_VERSION_ARCH.deb, the version's epoch colon written %3a.
    local name=${file%%_*} version=${file#*_}
    version=${version%_*}
    missing+=("$name=${version//%3a/:}")
  done <"$CACHE/manifest"
  if [ ${#missing[@]} -gt 0 ]; then
    log "downloading ${#missing[@]} packages into $CACHE/debs"
    (cd "$CACHE/debs" && papt apt-get download -qq "${missing[@]}") >"$CACHE/apt/download.log" 2>&1 || {
      tail -n 20 "$CACHE/apt/download.log" >&2
      die "apt-get download failed (above; all of it in $CACHE/apt/download.log)"
    }
  fi
  # Packages of an earlier resolution (PARLEY_APISERVER_REFRESH) go.
  local deb
  for deb in "$CACHE"/debs/*.deb; do
    grep -qF " ${deb##*/} " "$CACHE/manifest" || rm -f "$deb"
  done
}

# Unpacks every package of the manifest into $CACHE/root, anew whenever the manifest changed.
unpack_packages() {
  local want
  want=$(sha256sum <"$CACHE/manifest" | cut -d' ' -f1)
  [ "$(cat "$CACHE/root/.manifest" 2>/dev/null)" = "$want" ] && return 0
  log "unpacking $(wc -l <"$CACHE/manifest") packages into $CACHE/root"
  rm -rf "$CACHE/root" "$CACHE/root.new"
  mkdir -p "$CACHE/root.new"
  local uri file _rest
  while read -r uri file _rest; do
    dpkg -x "$CACHE/debs/$file" "$CACHE/root.new" || die "dpkg -x $file failed"
  done <"$CACHE/manifest"
  echo "$want" >"$CACHE/root.new/.manifest"
  mv "$CACHE/root.new" "$CACHE/root"
}

go_root() {
  local root
  root=$(find "$CACHE/root/usr/lib" -maxdepth 1 -name 'go-1.*' -type d | sort -V | tail -n 1)
  if [ -z "$root" ] || [ ! -x "$root/bin/go" ]; then die "no Go toolchain in $CACHE/root/usr/lib"; fi
  echo "$root"
}

# The Kubernetes release the library belongs to (library 0.X.Y is Kubernetes 1.X.Y), for /version.
kube_version() {
  local v
  v=$(sed -n 's#.*/golang-k8s-apiextensions-apiserver-dev_\([0-9.]*\).*#\1#p' "$CACHE/manifest" | head -n 1)
  [ -n "$v" ] && echo "1.${v#0.}" || echo "1.0.0"
}

build_stamp() {
  {
    cat "$CACHE/manifest" "$MAIN_SRC"
    echo "build flags v1"
  } | sha256sum | cut -d' ' -f1
}

go_build() {
  local goroot version major minor
  goroot=$(go_root)
  version=$(kube_version)
  major=${version%%.*}
  minor=${version#*.}
  minor=${minor%%.*}
  local build=$CACHE/build/parley-apiserver
  rm -rf "$CACHE/build"
  mkdir -p "$build" "$CACHE/bin" "$CACHE/gocache"
  cp "$MAIN_SRC" "$build/main.go"
  log "building apiextensions-apiserver (Kubernetes $version, $(basename "$goroot")): 5 to 10 minutes the first time, seconds after"
  local started=$SECONDS
  (
    cd "$build"
    env -u GOFLAGS -u GOPATH -u GOROOT GOENV=off GOTOOLCHAIN=local GOTELEMETRY=off GO111MODULE=off GOPROXY=off \
      GOWORK=off CGO_ENABLED=0 GOROOT="$goroot" GOPATH="$CACHE/root/usr/share/gocode" GOCACHE="$CACHE/gocache" \
      PATH="$goroot/bin:$PATH" \
      go build -trimpath -o "$SERVER_BIN.new" \
      -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v$version -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean" \
      .
  ) >"$CACHE/build.log" 2>&1 || {
    tail -n 40 "$CACHE/build.log" >&2
    die "go build failed (above; all of it in $CACHE/build.log)"
  }
  mv "$SERVER_BIN.new" "$SERVER_BIN"
  log "built in $((SECONDS - started)) s"
}

lock_cache() {
  mkdir -p "$CACHE"
  exec 8>"$CACHE/.lock"
  flock -w 3600 8 || die "another build holds $CACHE/.lock"
  if [ "${PARLEY_APISERVER_REFRESH:-}" = 1 ] || [ ! -s "$CACHE/manifest" ]; then resolve_packages; fi
}

# Downloads and unpacks the sources only (for reading them).
fetch() {
  lock_cache
  apt_state
  download_packages
  unpack_packages
  echo "$CACHE/root/usr/share/gocode/src"
}

build() {
  [ -r "$MAIN_SRC" ] || die "$MAIN_SRC is missing"
  lock_cache
  if [ -x "$SERVER_BIN" ] && [ -x "$ETCD_BIN" ] && [ "$(cat "$CACHE/bin/.stamp" 2>/dev/null)" = "$(build_stamp)" ]; then
    echo "$SERVER_BIN"
    echo "$ETCD_BIN"
    return 0
  fi
  apt_state
  download_packages
  unpack_packages
  mkdir -p "$CACHE/bin"
  rm -f "$CACHE/bin/.stamp"
  go_build
  cp "$CACHE/root/usr/bin/etcd" "$ETCD_BIN.new" || die "the etcd-server package holds no usr/bin/etcd"
  mv "$ETCD_BIN.new" "$ETCD_BIN"
  build_stamp >"$CACHE/bin/.stamp"
  rm -rf "$CACHE/build"
  echo "$SERVER_BIN"
  echo "$ETCD_BIN"
}

# ---------------------------------------------------------------------------------------- start, stop

# A TCP port nothing listens on, chosen by the kernel.
free_port() {
  if command -v python3 >/dev/null; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    return
  fi
  local port
  while :; do
    port=$((20000 + RANDOM % 30000))
    port_open "$port" || break
  done
  echo "$port"
}

# A CA, the server's certificate (127.0.0.1, localhost) and a client certificate in system:masters, the
# group every authorizer here lets do anything. Also the service-account key pair kube-apiserver wants.
make_certs() {
  local pki=$1
  command -v openssl >/dev/null || apt_install openssl || die "openssl is needed for the server's certificates"
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=parley-test-ca" \
      -keyout ca.key -out ca.crt
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout server.key -out server.csr
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile server.ext -out server.crt
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=parley-test-admin" \
      -keyout client.key -out client.csr
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile client.ext -out client.crt
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
  ) >"$pki/openssl.log" 2>&1 || {
    cat "$pki/openssl.log" >&2
    die "openssl failed (above)"
  }
}

write_kubeconfig() {
  local dir=$1 url=$2 pki=$1/pki
  cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: parley-test
  cluster:
    server: $url
    certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
- name: parley-test-admin
  user:
    client-certificate-data: $(base64 -w0 <"$pki/client.crt")
    client-key-data: $(base64 -w0 <"$pki/client.key")
contexts:
- name: parley-test
  context:
    cluster: parley-test
    user: parley-test-admin
    namespace: default
current-context: parley-test
EOF
  chmod 600 "$dir/kubeconfig"
}

# Starts a daemon detached from this shell (own session, no inherited descriptors) and prints its pid.
daemon() {
  local out=$1
  shift
  setsid "$@" </dev/null >"$out" 2>&1 8>&- 9>&- &
  echo $!
}

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

fail_start() {
  local dir=$1 what=$2 logfile=$3
  log "$what did not come up; the end of $logfile:"
  tail -n 30 "$logfile" >&2 || true
  stop "$dir" >/dev/null 2>&1 || true
  exit 1
}

# DIR as the caller meant it (this script runs in the repo's root).
abs_dir() {
  case "$1" in /*) echo "$1" ;; *) echo "$CALLER_PWD/$1" ;; esac
}

usage() {
  echo "usage: $0 build | start DIR | stop DIR | fetch" >&2
  exit 2
}

start() {
  [ -n "${1:-}" ] || usage
  local dir=$1
  dir=$(abs_dir "$dir")
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  local pid
  while read -r pid; do
    if alive "$pid"; then die "$dir has a server running already (pids: $(tr '\n' ' ' <"$dir/pids")); stop it first: $0 stop $dir"; fi
  done < <(cat "$dir/pids" 2>/dev/null)
  local server etcd full=""
  if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ] && [ -x "$KUBEBUILDER_ASSETS/etcd" ]; then
    server=$KUBEBUILDER_ASSETS/kube-apiserver
    etcd=$KUBEBUILDER_ASSETS/etcd
    full=1
    log "KUBEBUILDER_ASSETS: starting a full kube-apiserver from $KUBEBUILDER_ASSETS"
  else
    [ -n "${KUBEBUILDER_ASSETS:-}" ] && log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS has no kube-apiserver and etcd: using apiextensions-apiserver"
    build >/dev/null
    server=$SERVER_BIN
    etcd=$ETCD_BIN
  fi

  rm -rf "$dir/etcd" "$dir/pki" "$dir/certs"
  : >"$dir/pids"
  # Whatever fails from here on, nothing that was started is left running.
  trap 'stop "$dir" >/dev/null 2>&1 || true' EXIT
  make_certs "$dir/pki"

  local etcd_port peer_port api_port
  etcd_port=$(free_port)
  peer_port=$(free_port)
  api_port=$(free_port)
  while [ "$peer_port" = "$etcd_port" ]; do peer_port=$(free_port); done
  while [ "$api_port" = "$etcd_port" ] || [ "$api_port" = "$peer_port" ]; do api_port=$(free_port); done
  local etcd_url=http://127.0.0.1:$etcd_port url=https://127.0.0.1:$api_port

  local etcd_pid
  etcd_pid=$(daemon "$dir/etcd.log" "$etcd" --name parley-test --data-dir "$dir/etcd" \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "parley-test=http://127.0.0.1:$peer_port" --listen-metrics-urls "" \
    --unsafe-no-fsync --log-level warn)
  echo "$etcd_pid" >>"$dir/pids"
  local i
  for i in $(seq 1 100); do
    curl -fsS "$etcd_url/health" 2>/dev/null | grep -q '"health":"true"' && break
    alive "$etcd_pid" || fail_start "$dir" etcd "$dir/etcd.log"
    [ "$i" = 100 ] && fail_start "$dir" etcd "$dir/etcd.log"
    sleep 0.1
  done

  local pki=$dir/pki
  local args=(
    --etcd-servers "$etcd_url"
    --bind-address 127.0.0.1 --secure-port "$api_port"
    --tls-cert-file "$pki/server.crt" --tls-private-key-file "$pki/server.key"
    --client-ca-file "$pki/ca.crt"
    --cert-dir "$dir/certs"
    --enable-priority-and-fairness=false
  )
  if [ -n "$full" ]; then
    # As envtest starts it: RBAC (system:masters passes it), service accounts signed with the key above.
    args+=(
      --advertise-address 127.0.0.1
      --authorization-mode RBAC
      --service-cluster-ip-range 10.0.0.0/24
      --allow-privileged=true
      --service-account-issuer "$url"
      --service-account-key-file "$pki/sa.pub"
      --service-account-signing-key-file "$pki/sa.key"
      --disable-admission-plugins ServiceAccount
    )
  else
    args+=(
      # The generic server's informers of the core API (Services, for conversion webhooks) read through
      # this; it serves no core API, so they never sync, and /readyz's informer-sync check never passes.
      --kubeconfig "$dir/kubeconfig"
      # Nothing serves namespaces, webhook or policy configurations here: the plugins that need them go.
      --disable-admission-plugins "NamespaceLifecycle,MutatingAdmissionPolicy,MutatingAdmissionWebhook,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook"
    )
  fi
  write_kubeconfig "$dir" "$url"
  local server_pid
  server_pid=$(daemon "$dir/apiserver.log" "$server" "${args[@]}")
  echo "$server_pid" >>"$dir/pids"
  cat >"$dir/env" <<EOF
KUBECONFIG=$dir/kubeconfig
PARLEY_APISERVER_URL=$url
PARLEY_ETCD_URL=$etcd_url
EOF

  # informer-sync never passes on apiextensions-apiserver (it waits for informers of the built-in API
  # that nothing serves); the rest of /readyz does.
  local ready=(curl -fsS --cacert "$pki/ca.crt" --cert "$pki/client.crt" --key "$pki/client.key" "$url/readyz?exclude=informer-sync")
  command -v kubectl >/dev/null && ready=(kubectl --kubeconfig "$dir/kubeconfig" --request-timeout 2s get --raw '/readyz?exclude=informer-sync')
  for i in $(seq 1 600); do
    [ "$("${ready[@]}" 2>/dev/null)" = ok ] && break
    alive "$server_pid" || fail_start "$dir" "the API server" "$dir/apiserver.log"
    [ "$i" = 600 ] && fail_start "$dir" "the API server (60 s)" "$dir/apiserver.log"
    sleep 0.1
  done
  trap - EXIT
  log "API server ready at $url (etcd $etcd_url); logs in $dir; stop with: $0 stop $dir"
  echo "$dir/kubeconfig"
}

stop() {
  [ -n "${1:-}" ] || usage
  local dir=$1
  dir=$(abs_dir "$dir")
  [ -d "$dir" ] && dir=$(cd "$dir" && pwd)
  [ -s "$dir/pids" ] || {
    log "nothing started under $dir"
    return 0
  }
  local pid pids
  # The server first, then etcd.
  pids=$(tac "$dir/pids")
  for pid in $pids; do
    alive "$pid" || continue
    # Only a process this script started there (a pid can be reused after a reboot).
    grep -qaF -- "$dir/" "/proc/$pid/cmdline" 2>/dev/null || continue
    kill "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 100); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
  done
  rm -f "$dir/pids"
  log "stopped the API server under $dir"
}

case "${1:-}" in
  build) build ;;
  fetch) fetch ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  *) usage ;;
esac
