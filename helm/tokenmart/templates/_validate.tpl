{{/*
Rules across values that a JSON schema cannot express. Each failure names the value and what
to change; the app checks the same catalog again when it starts.
*/}}
{{- define "tokenmart.validate" -}}
{{- $groups := dict -}}
{{- range $index, $group := .Values.rayCluster.workerGroups -}}
{{- if hasKey $groups $group.name -}}
{{- fail (printf "rayCluster.workerGroups[%d]: the name %q is used twice" $index $group.name) -}}
{{- end -}}
{{- $_ := set $groups $group.name $group -}}
{{- end -}}
{{- $gpuGroups := list -}}
{{- range .Values.rayCluster.workerGroups -}}{{- if gt (int .gpusPerWorker) 0 -}}{{- $gpuGroups = append $gpuGroups .name -}}{{- end -}}{{- end -}}
{{- $ids := dict -}}
{{- range $index, $model := .Values.catalog.models -}}
{{- $where := printf "catalog.models[%d] (%s)" $index $model.id -}}
{{- if hasKey $ids $model.id -}}
{{- fail (printf "%s: the id is used twice" $where) -}}
{{- end -}}
{{- $_ := set $ids $model.id true -}}
{{- $accelerator := $model.accelerator | default dict -}}
{{- $engine := $model.engine | default dict -}}
{{- $tp := int ($engine.tensor_parallel_size | default 1) -}}
{{- $pp := int ($engine.pipeline_parallel_size | default 1) -}}
{{- if eq ($accelerator.kind | default "gpu") "gpu" -}}
{{- if not $accelerator.group -}}
{{- fail (printf "%s: a GPU listing must name its worker group in accelerator.group (one of: %s)" $where (join ", " $gpuGroups | default "none; add one to rayCluster.workerGroups")) -}}
{{- end -}}
{{- $group := get $groups $accelerator.group -}}
{{- if not $group -}}
{{- fail (printf "%s: accelerator.group %q is not in rayCluster.workerGroups (%s)" $where $accelerator.group (join ", " (keys $groups | sortAlpha))) -}}
{{- end -}}
{{- $perNode := int $group.gpusPerWorker -}}
{{- if eq $perNode 0 -}}
{{- fail (printf "%s: accelerator.group %q has gpusPerWorker 0 (a CPU group); give the group GPUs or set accelerator.kind: cpu" $where $accelerator.group) -}}
{{- end -}}
{{- if gt $tp $perNode -}}
{{- fail (printf "%s: tensor_parallel_size %d is larger than gpusPerWorker %d of worker group %q; a tensor-parallel group must fit one node" $where $tp $perNode $accelerator.group) -}}
{{- end -}}
{{- $most := mul $perNode (int $group.maxReplicas) -}}
{{- if gt (mul $tp $pp) $most -}}
{{- fail (printf "%s: tensor_parallel_size x pipeline_parallel_size = %d GPUs, more than worker group %q can ever have (gpusPerWorker %d x maxReplicas %d)" $where (mul $tp $pp) $accelerator.group $perNode (int $group.maxReplicas)) -}}
{{- end -}}
{{- if and $group.acceleratorType $accelerator.type (ne $group.acceleratorType $accelerator.type) -}}
{{- fail (printf "%s: accelerator.type %q differs from worker group %q's acceleratorType %q" $where $accelerator.type $accelerator.group $group.acceleratorType) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.existingSecret) -}}
{{- fail "redis.external.existingSecret: with redis.enabled false, name the Secret that holds the Redis URL" -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.host) -}}
{{- fail "ingress.host: set the host name the Ingress serves" -}}
{{- end -}}
{{- end -}}
