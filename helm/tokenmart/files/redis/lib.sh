# Shared by the start scripts of sentinel mode (POSIX sh: the Redis image's busybox or dash).
# From the pod's environment: REDIS_PASSWORD, MASTER_NAME, DATA_NAME, DATA_DOMAIN, DATA_COUNT,
# SENTINEL_NAME, SENTINEL_DOMAIN, SENTINEL_COUNT; REDIS_PORT and SENTINEL_PORT (6379, 26379).
# Every member is named by its stable DNS name (`<pod>.<headless Service>.<namespace>.svc`).

REDIS_PORT=${REDIS_PORT:-6379}
SENTINEL_PORT=${SENTINEL_PORT:-26379}

log() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $*" >&2; }

# cli HOST PORT COMMAND...: one redis-cli call that gives up after 3 s (a vanished host must not
# hold a start up), with the password from the environment rather than the command line.
cli() {
  host=$1
  port=$2
  shift 2
  REDISCLI_AUTH="$REDIS_PASSWORD" timeout 3 redis-cli -h "$host" -p "$port" "$@"
}

data_host() { echo "${DATA_NAME}-$1.${DATA_DOMAIN}"; }
sentinel_host() { echo "${SENTINEL_NAME}-$1.${SENTINEL_DOMAIN}"; }

# The primary's host as a Sentinel other than $1 reports it; fails when none knows one.
primary_from_sentinels() {
  i=0
  while [ "$i" -lt "$SENTINEL_COUNT" ]; do
    sentinel=$(sentinel_host "$i")
    i=$((i + 1))
    [ "$sentinel" = "$1" ] && continue
    reply=$(cli "$sentinel" "$SENTINEL_PORT" SENTINEL get-master-addr-by-name "$MASTER_NAME" 2>/dev/null) || continue
    host=$(echo "$reply" | sed -n 1p)
    port=$(echo "$reply" | sed -n 2p)
    case "$port" in '' | *[!0-9]*) continue ;; esac # no primary known, or an error reply
    log "Sentinel $sentinel names the primary: $host"
    echo "$host"
    return 0
  done
  return 1
}

# The primary as the data nodes see it, for when no Sentinel answers: the node that reports
# role:master with the most replicas, else the master_host most replicas name (a primary that
# restarted has none until it is up, but its replicas still name it). Fails when none answers.
primary_from_data_nodes() {
  best=""
  best_replicas=-1
  named=""
  i=0
  while [ "$i" -lt "$DATA_COUNT" ]; do
    node=$(data_host "$i")
    i=$((i + 1))
    info=$(cli "$node" "$REDIS_PORT" INFO replication 2>/dev/null | tr -d '\r') || continue
    if echo "$info" | grep -q '^role:master$'; then
      replicas=$(echo "$info" | sed -n 's/^connected_slaves:\([0-9]*\)$/\1/p')
      if [ "${replicas:-0}" -gt "$best_replicas" ]; then
        best=$node
        best_replicas=${replicas:-0}
      fi
    else
      named="$named$(echo "$info" | sed -n 's/^master_host:\(.*\)$/\1/p')
"
    fi
  done
  if [ -z "$best" ]; then
    best=$(printf '%s' "$named" | grep -v '^$' | sort | uniq -c | sort -rn | awk 'NR == 1 {print $2}')
  fi
  [ -n "$best" ] || return 1
  log "the data nodes name the primary: $best"
  echo "$best"
}

# Whether NAME resolves yet (a pod's DNS record appears once the pod has an IP).
resolves() { getent hosts "$1" >/dev/null 2>&1 || nslookup "$1" >/dev/null 2>&1; }
