{{/*
Rules across the chart's own values (secrets, volumes, upgrades, GCS fault tolerance) that a JSON
schema cannot express. Each failure names the value and what to change. The catalog's rules are
in _validate.tpl.
*/}}
{{- define "tokenmart.validateChart" -}}
{{- if not .Values.secrets.generate -}}
{{- if not .Values.adminToken.existingSecret -}}
{{- fail "adminToken.existingSecret: with secrets.generate false, name the Secret that holds the admin token" -}}
{{- end -}}
{{- if and .Values.redis.enabled (not .Values.redis.auth.existingSecret) -}}
{{- fail "redis.auth.existingSecret: with secrets.generate false, name the Secret that holds the Redis password" -}}
{{- end -}}
{{- if and (include "tokenmart.gcsRedisInChart" .) (not .Values.rayCluster.gcsFaultTolerance.existingSecret) -}}
{{- fail "rayCluster.gcsFaultTolerance.existingSecret: with secrets.generate false, name the Secret that holds the GCS Redis password" -}}
{{- end -}}
{{- end -}}
{{- with .Values.rayCluster.gcsFaultTolerance -}}
{{- if and .enabled .externalAddress (not .existingSecret) -}}
{{- fail "rayCluster.gcsFaultTolerance.existingSecret: with an externalAddress, name the Secret that holds that Redis's password" -}}
{{- end -}}
{{- end -}}
{{- $cache := .Values.rayCluster.modelCache -}}
{{- if and (eq $cache.type "hostPath") (not $cache.hostPath.path) -}}
{{- fail "rayCluster.modelCache.hostPath.path: with type hostPath, name the node folder of the cache" -}}
{{- end -}}
{{- $adapters := .Values.rayCluster.adapters -}}
{{- if and (eq $adapters.type "pvc") (not $adapters.existingClaim) -}}
{{- fail "rayCluster.adapters.existingClaim: with type pvc, name the claim that holds the adapters" -}}
{{- end -}}
{{- if and (eq $adapters.type "hostPath") (not $adapters.hostPath) -}}
{{- fail "rayCluster.adapters.hostPath: with type hostPath, name the node folder that holds the adapters" -}}
{{- end -}}
{{- if and (eq .Values.upgradeStrategy.type "NewClusterWithIncrementalUpgrade") (not .Values.upgradeStrategy.clusterUpgradeOptions) -}}
{{- fail "upgradeStrategy.clusterUpgradeOptions: NewClusterWithIncrementalUpgrade needs gatewayClassName, stepSizePercent and intervalSeconds" -}}
{{- end -}}
{{- end -}}
