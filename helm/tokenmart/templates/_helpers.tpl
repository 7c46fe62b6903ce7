{{/* Names and labels. */}}
{{- define "tokenmart.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object name. At most 40 characters, so that the longest suffix
(`-gcs-redis-headless`) stays within a 63-character DNS label, and starting with a letter: the
RayService's name is a DNS-1035 label (KubeRay names Services after it), so a release named
`1market` becomes `tm-1market-tokenmart`.
*/}}
{{- define "tokenmart.fullname" -}}
{{- $name := "" -}}
{{- if .Values.fullnameOverride -}}
{{- $name = .Values.fullnameOverride -}}
{{- else -}}
{{- $chart := include "tokenmart.name" . -}}
{{- $name = ternary .Release.Name (printf "%s-%s" .Release.Name $chart) (contains $chart .Release.Name) -}}
{{- end -}}
{{- $name = $name | lower | replace "." "-" -}}
{{- if not (regexMatch "^[a-z]" $name) -}}
{{- $name = printf "tm-%s" $name -}}
{{- end -}}
{{- $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "tokenmart.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokenmart.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tokenmart.labels" -}}
{{ include "tokenmart.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Every Ray pod (head and workers) carries these, for the PodMonitor and the metrics Service. */}}
{{- define "tokenmart.rayPodLabels" -}}
{{ include "tokenmart.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end -}}

{{- define "tokenmart.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{- define "tokenmart.redisSecretName" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "tokenmart.fullname" .)) -}}
{{- else -}}
{{- .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "tokenmart.adminSecretName" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin" (include "tokenmart.fullname" .)) -}}
{{- end -}}

{{/* The environment of every Ray pod: Redis and the admin token come from Secrets, never from values. */}}
{{- define "tokenmart.rayEnv" -}}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "tokenmart.redisSecretName" . }}
      key: {{ .Values.redis.auth.passwordKey }}
- name: REDIS_URL
  value: {{ include "tokenmart.redisURL" . | quote }}
{{- else }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "tokenmart.redisSecretName" . }}
      key: {{ .Values.redis.external.urlKey }}
{{- end }}
- name: TOKENMART_SPOOL_DIR
  value: /var/lib/tokenmart/spool
# Ray Serve's HTTP proxy loads tokenmart's request-id guard (deployments/request_id.py PROXY_ENV).
- name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
  value: tokenmart.deployments.request_id:proxy_middlewares
- name: TOKENMART_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "tokenmart.adminSecretName" . }}
      key: {{ .Values.adminToken.key }}
{{- with .Values.rayCluster.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The Serve config: the project's app builder with the catalog from values. GPU worker groups
become the catalog's worker_groups (in the catalog file's snake_case schema), so the app
checks placement against the same groups the cluster has.
*/}}
{{- define "tokenmart.appArgs" -}}
{{- $groups := list -}}
{{- range .Values.rayCluster.workerGroups -}}
{{- if gt (int .gpusPerWorker) 0 -}}
{{- $groups = append $groups (dict "name" .name "accelerator_type" .acceleratorType "gpus_per_worker" .gpusPerWorker "min_replicas" .minReplicas "max_replicas" .maxReplicas "resources" (.resources | default dict)) -}}
{{- end -}}
{{- end -}}
{{- $catalog := dict "listings" .Values.catalog.models -}}
{{- if $groups -}}{{- $_ := set $catalog "worker_groups" $groups -}}{{- end -}}
{{- $app := .Values.app -}}
{{- dict "catalog" $catalog "model_dir" $app.modelDir "redis_timeout_s" $app.redisTimeoutS "ingress" $app.ingress "default_limits" $app.defaultLimits "metrics" $app.metrics "accounts" $app.accounts | toYaml -}}
{{- end -}}

{{- define "tokenmart.serveConfig" -}}
applications:
  - name: tokenmart
    route_prefix: /
    import_path: tokenmart.deployments.app:build_app
    args:
{{ include "tokenmart.appArgs" . | indent 6 }}
{{- end -}}

{{- define "tokenmart.spoolVolume" -}}
- name: spool
{{- if .Values.rayCluster.spool.hostPath }}
  hostPath:
    path: {{ .Values.rayCluster.spool.hostPath }}
    type: DirectoryOrCreate
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{/* The GCS fault-tolerance Redis: the chart's own small instance, or an external one. */}}
{{- define "tokenmart.gcsRedisAddress" -}}
{{- .Values.rayCluster.gcsFaultTolerance.externalAddress | default (printf "%s-gcs-redis:6379" (include "tokenmart.fullname" .)) -}}
{{- end -}}

{{- define "tokenmart.gcsRedisSecretName" -}}
{{- .Values.rayCluster.gcsFaultTolerance.existingSecret | default (printf "%s-gcs-redis" (include "tokenmart.fullname" .)) -}}
{{- end -}}

{{- define "tokenmart.gcsRedisInChart" -}}
{{- if and .Values.rayCluster.gcsFaultTolerance.enabled (not .Values.rayCluster.gcsFaultTolerance.externalAddress) -}}true{{- end -}}
{{- end -}}
