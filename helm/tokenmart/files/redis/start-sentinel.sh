#!/bin/sh
# A Sentinel. It monitors the primary the other Sentinels name, else the one the data nodes
# name, else pod 0 (the first start of the set); a wrong guess is corrected by the other
# Sentinels' hello messages, which carry the newest failover's address. Its state lives in
# an emptyDir: a restarted Sentinel learns the rest again from the set. Arguments: more settings.
set -eu
. "$(dirname "$0")/lib.sh"

ME=$(sentinel_host "${POD_NAME##*-}")
PRIMARY=$(primary_from_sentinels "$ME" || primary_from_data_nodes || data_host 0)

# Sentinel refuses a config whose primary does not resolve, so wait until its pod has a DNS record.
waited=0
until resolves "$PRIMARY"; do
  if [ "$waited" -ge "${RESOLVE_WAIT_S:-120}" ]; then
    log "$PRIMARY did not resolve within ${waited} s"
    exit 1
  fi
  sleep 2
  waited=$((waited + 2))
done

CONF=${CONF_DIR:-/data}/sentinel.conf
cat >"$CONF" <<CONFIG
port $SENTINEL_PORT
dir ${CONF_DIR:-/data}
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $ME
sentinel announce-port $SENTINEL_PORT
requirepass "$REDIS_PASSWORD"
sentinel sentinel-pass "$REDIS_PASSWORD"
sentinel monitor $MASTER_NAME $PRIMARY $REDIS_PORT $QUORUM
sentinel auth-pass $MASTER_NAME "$REDIS_PASSWORD"
sentinel down-after-milliseconds $MASTER_NAME $DOWN_AFTER_MILLISECONDS
sentinel failover-timeout $MASTER_NAME $FAILOVER_TIMEOUT
sentinel parallel-syncs $MASTER_NAME 1
CONFIG
log "starting Sentinel $ME, monitoring $MASTER_NAME at $PRIMARY"
exec redis-server "$CONF" --sentinel "$@"
