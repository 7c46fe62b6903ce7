{{/*
Generated from deployments/placement.py (RULES) by `python -m tokenmart.cluster.chart_rules`; do not edit.
The placement checks of the catalog against rayCluster.workerGroups: the same rules, in the same
order and with the same messages as the app's, plus those only the chart can check. The render
fails on the first broken rule.
*/}}
{{- define "tokenmart.placementRules" -}}
{{- $gpu_by_name := dict -}}
{{- $gpu_groups := list -}}
{{- $cpu_groups := list -}}
{{- range $.Values.rayCluster.workerGroups -}}
{{- if gt (int .gpusPerWorker) 0 -}}
{{- $_ := set $gpu_by_name .name . -}}
{{- $gpu_groups = append $gpu_groups .name -}}
{{- else -}}
{{- $cpu_groups = append $cpu_groups .name -}}
{{- end -}}
{{- end -}}
{{- $pools_known := true -}}
{{- $listed := join ", " $gpu_groups | default "none; add one to rayCluster.workerGroups" -}}
{{- $known := join ", " (sortAlpha $gpu_groups) | default "none with GPUs" -}}
{{- range $index, $model := $.Values.catalog.models -}}
{{- $accelerator := $model.accelerator | default dict -}}
{{- $engine := $model.engine | default dict -}}
{{- $where := printf "catalog.models[%d] (%v)" $index $model.id -}}
{{- $gpu := eq ($accelerator.kind | default "gpu") "gpu" -}}
{{- $listing_type := $accelerator.type | default "" -}}
{{- $group_named := kindIs "string" $accelerator.group -}}
{{- $group := $accelerator.group | default "" -}}
{{- $tp := int ($engine.tensor_parallel_size | default 1) -}}
{{- $pp := int ($engine.pipeline_parallel_size | default 1) -}}
{{- $gpus := mul $tp $pp -}}
{{- $heads := int ($model.attention_heads | default 0) -}}
{{- $divisor_list := list -}}
{{- range $size := untilStep 1 17 1 -}}
{{- if and (le $size $heads) (eq (mod $heads $size) 0) -}}
{{- $divisor_list = append $divisor_list $size -}}
{{- end -}}
{{- end -}}
{{- $divisors := join ", " $divisor_list -}}
{{- $group_found := hasKey $gpu_by_name $group -}}
{{- $per_node := 0 -}}
{{- $max_replicas := 0 -}}
{{- $group_type := "" -}}
{{- if $group_found -}}
{{- $spec := get $gpu_by_name $group -}}
{{- $per_node = int $spec.gpusPerWorker -}}
{{- $max_replicas = int $spec.maxReplicas -}}
{{- $group_type = $spec.acceleratorType | default "" -}}
{{- end -}}
{{- /* cpu-listing-has-no-type */ -}}
{{- if and (not $gpu) $listing_type -}}
{{- fail (printf "%v: accelerator.type applies only to kind: gpu" $where) -}}
{{- end -}}
{{- /* tp-divides-attention-heads */ -}}
{{- if and $gpu $heads (mod $heads $tp) -}}
{{- fail (printf "%v: tensor_parallel_size %v does not divide its %v attention heads; use one of %v" $where $tp $heads $divisors) -}}
{{- end -}}
{{- /* gpu-listing-names-group (the chart only) */ -}}
{{- if and $gpu (not $group_named) -}}
{{- fail (printf "%v: a GPU listing must name its worker group in accelerator.group (one of: %v)" $where $listed) -}}
{{- end -}}
{{- /* group-has-gpus (the chart only) */ -}}
{{- if and $gpu (has $group $cpu_groups) (not $gpu_groups) -}}
{{- fail (printf "%v: accelerator.group %q has gpusPerWorker 0 (a CPU group); give the group GPUs or set accelerator.kind: cpu" $where $group) -}}
{{- end -}}
{{- /* group-is-known */ -}}
{{- if and $gpu $group_named $pools_known (not $group_found) -}}
{{- fail (printf "%v: accelerator.group %q is not in rayCluster.workerGroups (%v)" $where $group $known) -}}
{{- end -}}
{{- /* type-matches-group */ -}}
{{- if and $gpu $group_found $listing_type $group_type (ne $listing_type $group_type) -}}
{{- fail (printf "%v: accelerator.type %q does not match worker group %q (acceleratorType %q); change one of them" $where $listing_type $group $group_type) -}}
{{- end -}}
{{- /* tp-fits-one-node */ -}}
{{- if and $gpu $group_found (gt $tp $per_node) -}}
{{- fail (printf "%v: tensor_parallel_size %v is larger than gpusPerWorker %v of worker group %q; a tensor-parallel group must fit one node: lower tensor_parallel_size (and raise pipeline_parallel_size) or use a group with at least %v GPUs per node" $where $tp $per_node $group $tp) -}}
{{- end -}}
{{- /* node-is-a-multiple-of-tp */ -}}
{{- if and $gpu $group_found (le $tp $per_node) (lt $per_node $gpus) (mod $per_node $tp) -}}
{{- fail (printf "%v: pipeline stages span nodes, so gpusPerWorker %v of worker group %q must be a multiple of tensor_parallel_size %v" $where $per_node $group $tp) -}}
{{- end -}}
{{- /* replica-fits-group */ -}}
{{- if and $gpu $group_found (gt $gpus (mul $per_node $max_replicas)) -}}
{{- fail (printf "%v: tensor_parallel_size x pipeline_parallel_size = %v GPUs, more than worker group %q can ever have (gpusPerWorker %v x maxReplicas %v); raise its maxReplicas" $where $gpus $group $per_node $max_replicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}
