# shellcheck shell=bash
# Installs and starts what Parley's tests and quickstart need, when it is missing. Sourced by scripts/*.

APERTIUM_PACKAGES=(apertium-apy apertium-eng-spa apertium-eng-cat)
APERTIUM_MODES=${PARLEY_APERTIUM_MODES:-/usr/share/apertium/modes}

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1
  fi
}

apt_install() {
  if ! command -v apt-get >/dev/null; then
    log "apt-get is not available. Install these yourself, then run this again: $*"
    return 1
  fi
  log "installing $*"
  as_root apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure_apertium() {
  local missing=()
  command -v apertium-apy >/dev/null || missing+=(apertium-apy)
  [ -e "$APERTIUM_MODES/eng-spa.mode" ] || missing+=(apertium-eng-spa)
  [ -e "$APERTIUM_MODES/eng-cat.mode" ] || missing+=(apertium-eng-cat)
  if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}" || {
      log "Apertium is needed for translation: install ${APERTIUM_PACKAGES[*]} (Debian/Ubuntu) or see https://wiki.apertium.org/wiki/Apertium-apy"
      return 1
    }
  fi
}

# Starts an Apertium APY on port $1 unless something already listens there.
ensure_apy_running() {
  local port=$1
  port_open "$port" && return 0
  log "starting apertium-apy on port $port (log: /tmp/parley-apertium-$port.log)"
  nohup apertium-apy -p "$port" "$APERTIUM_MODES" >"/tmp/parley-apertium-$port.log" 2>&1 &
  for _ in $(seq 1 100); do port_open "$port" && return 0; sleep 0.2; done
  log "apertium-apy did not start; see /tmp/parley-apertium-$port.log"
  return 1
}

# RabbitMQ counts the files of every quorum queue against its open-file limit. At Debian's default soft
# limit of 1024 a few hundred queues (a test run declares that many) leave no handle for a new
# connection, which then hangs before the AMQP handshake. Where this script starts the broker it
# raises the limit; a running broker with a low one gets a warning.
RABBITMQ_ENV=/etc/rabbitmq/rabbitmq-env.conf

rabbitmq_file_limit() {
  grep -qs '^ulimit -S -n' "$RABBITMQ_ENV" && return 0
  local limit
  limit=$(ulimit -Hn)
  [ "$limit" = unlimited ] && limit=65536
  log "raising RabbitMQ's open-file limit to $limit ($RABBITMQ_ENV)"
  echo "ulimit -S -n $limit" | as_root tee -a "$RABBITMQ_ENV" >/dev/null
}

warn_low_file_limit() {
  local limit
  limit=$(as_root rabbitmqctl -q eval 'file_handle_cache:get_limit().' 2>/dev/null | tr -dc 0-9)
  if [ -n "$limit" ] && [ "$limit" -lt 4000 ]; then
    log "warning: RabbitMQ may open only $limit files; the tests' quorum queues can exhaust that and hang new connections. Add 'ulimit -S -n 20000' to $RABBITMQ_ENV and restart RabbitMQ"
  fi
}

# RabbitMQ's management API on 15672: the operator's scale-to-zero asks it for the messages
# translators hold unacknowledged (broker.managementUrl).
ensure_rabbitmq_management() {
  port_open 15672 && return 0
  log "enabling RabbitMQ's management plugin"
  as_root rabbitmq-plugins enable rabbitmq_management >/dev/null
  for _ in $(seq 1 100); do port_open 15672 && return 0; sleep 0.3; done
  log "RabbitMQ's management API did not come up on 127.0.0.1:15672"
  return 1
}

ensure_rabbitmq() {
  ensure_rabbitmq_broker && ensure_rabbitmq_management
}

ensure_rabbitmq_broker() {
  if port_open 5672 && command -v rabbitmqctl >/dev/null; then warn_low_file_limit; return 0; fi
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server || {
    log "RabbitMQ is needed: install rabbitmq-server and start it on 127.0.0.1:5672"
    return 1
  }
  if ! port_open 5672; then
    rabbitmq_file_limit
    log "starting RabbitMQ"
    as_root rabbitmq-server -detached
  fi
  for _ in $(seq 1 150); do port_open 5672 && as_root rabbitmqctl -q await_startup >/dev/null 2>&1 && return 0; sleep 0.4; done
  log "RabbitMQ did not come up on 127.0.0.1:5672"
  return 1
}

# The PostgreSQL the tests use; the password is set below where the server asks for one.
POSTGRES_URL=${PARLEY_TEST_POSTGRES_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}

postgres_answers() { psql "$POSTGRES_URL" -qtAc "SELECT 1" >/dev/null 2>&1; }

ensure_postgres() {
  if command -v psql >/dev/null && postgres_answers; then return 0; fi
  if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    apt_install postgresql || {
      log "PostgreSQL is needed for the history tests: install postgresql and start it on 127.0.0.1:5432"
      return 1
    }
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if ! port_open 5432; then
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
  fi
  for _ in $(seq 1 100); do port_open 5432 && break; sleep 0.2; done
  # A fresh Debian cluster asks TCP clients for a password: give the postgres role the tests' one.
  if ! postgres_answers; then
    as_root su postgres -c "psql -qc \"ALTER ROLE postgres PASSWORD 'postgres'\"" >/dev/null
  fi
  postgres_answers || { log "PostgreSQL does not answer at $POSTGRES_URL"; return 1; }
}

# promtool checks and unit-tests the chart's alerting rules (scripts/check_chart.py). Debian ships it
# in the prometheus package, whose install also sets up a Prometheus server as a service: where the
# init system lets the package start it (not in containers whose policy-rc.d forbids it), it is stopped
# and disabled again, so that the install leaves no server on port 9090. A Prometheus that was running
# before is left alone.
ensure_promtool() {
  command -v promtool >/dev/null && return 0
  if ! command -v apt-get >/dev/null; then
    log "promtool is needed for the chart's alert checks: install Prometheus (it ships promtool) or see https://prometheus.io/download/"
    return 1
  fi
  local before
  before=$(pgrep -x prometheus || true)
  log "installing prometheus (for promtool)"
  as_root apt-get update -qq >/dev/null
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null || {
    log "promtool is needed for the chart's alert checks: install the prometheus package (Debian/Ubuntu)"
    return 1
  }
  [ -n "$before" ] || stop_packaged_prometheus
  command -v promtool >/dev/null || { log "the prometheus package installed no promtool"; return 1; }
}

# Stops (and, under systemd, disables) the Prometheus server of Debian's prometheus package.
stop_packaged_prometheus() {
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  elif command -v service >/dev/null; then
    as_root service prometheus stop >/dev/null 2>&1 || true
    if command -v update-rc.d >/dev/null; then as_root update-rc.d prometheus disable >/dev/null 2>&1 || true; fi
  fi
  local pid
  for pid in $(pgrep -x -u prometheus prometheus || true); do
    # One that has just exited (a zombie until reaped) holds no port.
    case "$(ps -o stat= -p "$pid" 2>/dev/null)" in Z* | "") continue ;; esac
    log "stopping the Prometheus server the prometheus package started (pid $pid)"
    as_root kill "$pid" || true
  done
}

# The OpenID Connect provider the sign-in tests get tokens from (tests/oidc: the npm package
# oidc-provider on Node.js), installed from its lock file.
ensure_oidc_provider() {
  npm_ci_when_stale tests/oidc "the test OpenID provider"
}

# Node.js, and `npm ci` in the repository's directory $1 (what $2 names) when its node_modules is
# missing or older than its lock file.
npm_ci_when_stale() {
  command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
  local dir
  dir="$(dirname "${BASH_SOURCE[0]}")/../$1"
  if [ ! -e "$dir/node_modules/.package-lock.json" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    log "installing $2 (npm ci in $1)"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  fi
}

# openssl and socat: the broker TLS test makes its certificates with openssl and fronts the test
# broker with socat's TLS listener.
ensure_tls_tools() {
  local missing=()
  command -v openssl >/dev/null || missing+=(openssl)
  command -v socat >/dev/null || missing+=(socat)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

# Headless Chromium (Debian's chromium and chromium-driver) and puppeteer-core (tests/browser), for the
# chat page's browser test.
ensure_browser() {
  command -v chromium >/dev/null || apt_install chromium chromium-driver
  npm_ci_when_stale tests/browser "the browser test's driver"
}
