#!/bin/sh
# A data node of sentinel mode. Before Redis starts, find the current primary: first from the
# Sentinels (they know about every failover), then from the other data nodes (every Sentinel
# down), and only when nobody answers, pod 0 (the first start of the set). Start as the primary
# when that is this pod, as its replica otherwise; from then on the Sentinels reconfigure it.
# Arguments: redis-server's settings (the chart's, shared with standalone mode).
set -eu
. "$(dirname "$0")/lib.sh"

ME=$(data_host "${POD_NAME##*-}")
PRIMARY=""
attempt=0
while [ "$attempt" -lt "${FIND_ATTEMPTS:-5}" ]; do
  PRIMARY=$(primary_from_sentinels "" || primary_from_data_nodes || true)
  [ -n "$PRIMARY" ] && break
  attempt=$((attempt + 1))
  sleep 2
done
if [ -z "$PRIMARY" ]; then
  PRIMARY=$(data_host 0)
  log "no Sentinel or data node answered: pod 0 ($PRIMARY) is the primary"
fi

# Sentinel rewrites the config file when it reconfigures this node (CONFIG REWRITE), so Redis
# gets a writable one; it is written afresh at every start.
CONF=${CONF_DIR:-/run/redis}/redis.conf
{
  echo "port $REDIS_PORT"
  echo "replica-announce-ip $ME"
  echo "replica-announce-port $REDIS_PORT"
  if [ "$PRIMARY" != "$ME" ]; then
    echo "replicaof $PRIMARY $REDIS_PORT"
  fi
} >"$CONF"
if [ "$PRIMARY" = "$ME" ]; then
  log "starting $ME as the primary"
else
  log "starting $ME as a replica of $PRIMARY"
fi
exec redis-server "$CONF" "$@"
