{{/*
The in-chart billing Redis: its names, its settings and the URL the app gets. In `sentinel`
mode every address is a stable per-pod DNS name (`<pod>.<headless Service>.<namespace>.svc`):
the data nodes announce theirs (replica-announce-ip) and the Sentinels theirs (announce-ip),
so a restarted pod, whatever its new IP, is the same member to the others and to clients.
*/}}

{{- define "tokenmart.redisSentinelMode" -}}
{{- if and .Values.redis.enabled (eq .Values.redis.mode "sentinel") -}}true{{- end -}}
{{- end -}}

{{/* The data nodes' StatefulSet and headless Service; pod N is `<fullname>-redis-N`. */}}
{{- define "tokenmart.redisDataName" -}}
{{- printf "%s-redis" (include "tokenmart.fullname" .) -}}
{{- end -}}

{{- define "tokenmart.redisDataDomain" -}}
{{- printf "%s-redis-headless.%s.svc" (include "tokenmart.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* The Sentinels' StatefulSet and its headless Service (one name for both). */}}
{{- define "tokenmart.redisSentinelName" -}}
{{- printf "%s-sentinel" (include "tokenmart.fullname" .) -}}
{{- end -}}

{{- define "tokenmart.redisSentinelDomain" -}}
{{- printf "%s.%s.svc" (include "tokenmart.redisSentinelName" .) .Release.Namespace -}}
{{- end -}}

{{/* host:port of every Sentinel, comma-separated, as the app's URL lists them. */}}
{{- define "tokenmart.redisSentinelAddresses" -}}
{{- $name := include "tokenmart.redisSentinelName" . -}}
{{- $domain := include "tokenmart.redisSentinelDomain" . -}}
{{- $addresses := list -}}
{{- range $i := until (int .Values.redis.sentinel.replicas) -}}
{{- $addresses = append $addresses (printf "%s-%d.%s:26379" $name $i $domain) -}}
{{- end -}}
{{- join "," $addresses -}}
{{- end -}}

{{/*
The app's Redis URL, with the password that the Ray pods' REDIS_PASSWORD holds (Kubernetes
expands `$(REDIS_PASSWORD)` when the container starts). Sentinel mode: the Sentinels, the
primary's name and db 0, the same password for the Sentinels (`sentinel_password`).
*/}}
{{- define "tokenmart.redisURL" -}}
{{- if include "tokenmart.redisSentinelMode" . -}}
{{- printf "redis+sentinel://:$(REDIS_PASSWORD)@%s/%s/0?sentinel_password=$(REDIS_PASSWORD)" (include "tokenmart.redisSentinelAddresses" .) .Values.redis.sentinel.masterName -}}
{{- else -}}
{{- printf "redis://:$(REDIS_PASSWORD)@%s-redis:6379/0" (include "tokenmart.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
redis-server's settings, the same in both modes (a replica may become the primary): AOF, RDB
snapshots or none, and a memory limit that never evicts (a key or balance that Redis deleted
under memory pressure would be money lost without a trace; refused writes answer 503 instead).
*/}}
{{- define "tokenmart.redisServerArgs" -}}
{{- $redis := .Values.redis -}}
- --appendonly
- "yes"
- --appendfsync
- {{ $redis.persistence.appendfsync }}
{{- if $redis.persistence.rdbSnapshots }}
- --save
- "3600"
- "1"
- "300"
- "100"
- "60"
- "10000"
{{- else }}
- --save
- ""
{{- end }}
- --maxmemory
- {{ $redis.maxmemory | quote }}
- --maxmemory-policy
- noeviction
- --dir
- /data
- --requirepass
- $(REDIS_PASSWORD)
{{- end -}}

{{/* Redis values that only make sense together; the render fails naming the value. */}}
{{- define "tokenmart.validateRedis" -}}
{{- $redis := .Values.redis -}}
{{- if include "tokenmart.redisSentinelMode" . -}}
{{- if lt (int $redis.replicas) 1 -}}
{{- fail "redis.replicas: sentinel mode needs at least 1 replica to fail over to" -}}
{{- end -}}
{{- if gt (int $redis.sentinel.quorum) (int $redis.sentinel.replicas) -}}
{{- fail (printf "redis.sentinel.quorum: %d Sentinels can never agree as %d (set it to at most redis.sentinel.replicas)" (int $redis.sentinel.replicas) (int $redis.sentinel.quorum)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* What the start scripts of sentinel mode need to name every member (files/redis/lib.sh). */}}
{{- define "tokenmart.redisSentinelEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: MASTER_NAME
  value: {{ .Values.redis.sentinel.masterName | quote }}
- name: DATA_NAME
  value: {{ include "tokenmart.redisDataName" . | quote }}
- name: DATA_DOMAIN
  value: {{ include "tokenmart.redisDataDomain" . | quote }}
- name: DATA_COUNT
  value: {{ add 1 (int .Values.redis.replicas) | quote }}
- name: SENTINEL_NAME
  value: {{ include "tokenmart.redisSentinelName" . | quote }}
- name: SENTINEL_DOMAIN
  value: {{ include "tokenmart.redisSentinelDomain" . | quote }}
- name: SENTINEL_COUNT
  value: {{ .Values.redis.sentinel.replicas | quote }}
{{- end -}}

{{/*
Spread a sentinel-mode component over nodes when the cluster has them: one node lost must take
at most one data node and one Sentinel. Preferred, so a small cluster still schedules them all.
*/}}
{{- define "tokenmart.redisSpread" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "tokenmart.selectorLabels" .context | nindent 12 }}
            app.kubernetes.io/component: {{ .component }}
{{- end -}}
