{{/*
Rules across values that a JSON schema cannot express. Each failure names the value and what
to change; the app checks the same catalog again when it starts. The placement checks (a
listing's worker group, its TP x PP, attention heads, accelerator type) are generated from
deployments/placement.py into _placement_rules.tpl: edit the rules there and run
`python -m tokenmart.cluster.chart_rules`, never that file.
*/}}
{{- define "tokenmart.validate" -}}
{{- $groups := dict -}}
{{- range $index, $group := .Values.rayCluster.workerGroups -}}
{{- if hasKey $groups $group.name -}}
{{- fail (printf "rayCluster.workerGroups[%d]: the name %q is used twice" $index $group.name) -}}
{{- end -}}
{{- $_ := set $groups $group.name $group -}}
{{- end -}}
{{- $ids := dict -}}
{{- range $index, $model := .Values.catalog.models -}}
{{- if hasKey $ids $model.id -}}
{{- fail (printf "catalog.models[%d] (%s): the id is used twice" $index $model.id) -}}
{{- end -}}
{{- $_ := set $ids $model.id true -}}
{{- end -}}
{{- include "tokenmart.placementRules" . -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.existingSecret) -}}
{{- fail "redis.external.existingSecret: with redis.enabled false, name the Secret that holds the Redis URL" -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.host) -}}
{{- fail "ingress.host: set the host name the Ingress serves" -}}
{{- end -}}
{{- end -}}
