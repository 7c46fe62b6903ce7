{{/*
Generated from deployments/catalog_rules.py (RULES) by `python -m tokenmart.cluster.chart_rules`; do not edit.
The catalog's rules across values: the same rules, in the same order and with the same messages
as the app's, plus those only the chart can check; first each worker group, then each listing.
The render fails on the first broken rule.
*/}}
{{- define "tokenmart.catalogRules" -}}
{{- $seen_groups := dict -}}
{{- range $index, $spec := $.Values.rayCluster.workerGroups -}}
{{- $where := printf "rayCluster.workerGroups[%d]" $index -}}
{{- $name := $spec.name -}}
{{- $repeated := hasKey $seen_groups $name -}}
{{- $_ := set $seen_groups $name true -}}
{{- $group_min := int $spec.minReplicas -}}
{{- $group_max := int $spec.maxReplicas -}}
{{- /* group-name-is-unique */ -}}
{{- if $repeated -}}
{{- fail (printf "%v: the name %q is used twice" $where $name) -}}
{{- end -}}
{{- /* group-min-within-max */ -}}
{{- if gt $group_min $group_max -}}
{{- fail (printf "%v: minReplicas %v of worker group %q is larger than its maxReplicas %v" $where $group_min $name $group_max) -}}
{{- end -}}
{{- end -}}
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
{{- $seen_ids := dict -}}
{{- range $index, $model := $.Values.catalog.models -}}
{{- $accelerator := $model.accelerator | default dict -}}
{{- $engine := $model.engine | default dict -}}
{{- $scaling := $model.autoscaling | default dict -}}
{{- $extra := $engine.extra | default dict -}}
{{- $where := printf "catalog.models[%d] (%v)" $index $model.id -}}
{{- $offer_ids := list (toString $model.id) -}}
{{- with $model.lora -}}
{{- range .adapters -}}
{{- $offer_ids = append $offer_ids (toString .id) -}}
{{- end -}}
{{- end -}}
{{- $repeated_id := "" -}}
{{- range $offer := $offer_ids -}}
{{- if and (not $repeated_id) (hasKey $seen_ids $offer) -}}
{{- $repeated_id = $offer -}}
{{- end -}}
{{- $_ := set $seen_ids $offer true -}}
{{- end -}}
{{- $context_length := int $model.context_length -}}
{{- $scale_min := int 1 -}}
{{- if hasKey $scaling "min_replicas" -}}{{- $scale_min = int $scaling.min_replicas -}}{{- end -}}
{{- $scale_max := int 1 -}}
{{- if hasKey $scaling "max_replicas" -}}{{- $scale_max = int $scaling.max_replicas -}}{{- end -}}
{{- $look_back := float64 5.0 -}}
{{- if hasKey $scaling "look_back_period_s" -}}{{- $look_back = float64 $scaling.look_back_period_s -}}{{- end -}}
{{- $metrics_interval := float64 1.0 -}}
{{- if hasKey $scaling "metrics_interval_s" -}}{{- $metrics_interval = float64 $scaling.metrics_interval_s -}}{{- end -}}
{{- $default_max_tokens := int 256 -}}
{{- if hasKey $model "default_max_tokens" -}}{{- $default_max_tokens = int $model.default_max_tokens -}}{{- end -}}
{{- $extra_typed_keys := list -}}
{{- range $key := list "dtype" "max_model_len" "max_num_seqs" "pipeline_parallel_size" "tensor_parallel_size" -}}
{{- if hasKey $extra $key -}}{{- $extra_typed_keys = append $extra_typed_keys $key -}}{{- end -}}
{{- end -}}
{{- $extra_typed := join ", " $extra_typed_keys -}}
{{- $extra_lora_keys := list -}}
{{- range $key := list "enable_lora" "max_cpu_loras" "max_lora_rank" "max_loras" -}}
{{- if hasKey $extra $key -}}{{- $extra_lora_keys = append $extra_lora_keys $key -}}{{- end -}}
{{- end -}}
{{- $extra_lora := join ", " $extra_lora_keys -}}
{{- $extra_tools_keys := list -}}
{{- range $key := list "enable_auto_tool_choice" "tool_call_parser" -}}
{{- if hasKey $extra $key -}}{{- $extra_tools_keys = append $extra_tools_keys $key -}}{{- end -}}
{{- end -}}
{{- $extra_tools := join ", " $extra_tools_keys -}}
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
{{- $capacity := 0 -}}
{{- if $group_found -}}
{{- $spec := get $gpu_by_name $group -}}
{{- $per_node = int $spec.gpusPerWorker -}}
{{- $max_replicas = int $spec.maxReplicas -}}
{{- $group_type = $spec.acceleratorType | default "" -}}
{{- if le $gpus $per_node -}}
{{- $capacity = mul (div $per_node $gpus) $max_replicas -}}
{{- else -}}
{{- $capacity = div (mul $per_node $max_replicas) $gpus -}}
{{- end -}}
{{- end -}}
{{- /* model-id-is-unique */ -}}
{{- if $repeated_id -}}
{{- fail (printf "%v: model id %q appears more than once (listings and LoRA adapters share one namespace)" $where $repeated_id) -}}
{{- end -}}
{{- /* default-max-tokens-within-context */ -}}
{{- if and $context_length (ge $default_max_tokens $context_length) -}}
{{- fail (printf "%v: default_max_tokens %v must be smaller than context_length %v" $where $default_max_tokens $context_length) -}}
{{- end -}}
{{- /* extra-sets-no-typed-engine-arg */ -}}
{{- if $extra_typed -}}
{{- fail (printf "%v: field engine.extra: set %v as its own field (or context_length), not in extra" $where $extra_typed) -}}
{{- end -}}
{{- /* extra-sets-no-lora-engine-arg */ -}}
{{- if $extra_lora -}}
{{- fail (printf "%v: field engine.extra: set LoRA serving in the listing's lora block, not %v in extra" $where $extra_lora) -}}
{{- end -}}
{{- /* extra-sets-no-tool-engine-arg */ -}}
{{- if $extra_tools -}}
{{- fail (printf "%v: field engine.extra: set tool calling with engine.tool_parser, not %v in extra" $where $extra_tools) -}}
{{- end -}}
{{- /* min-replicas-within-max */ -}}
{{- if gt $scale_min $scale_max -}}
{{- fail (printf "%v: autoscaling.min_replicas %v is larger than autoscaling.max_replicas %v" $where $scale_min $scale_max) -}}
{{- end -}}
{{- /* look-back-longer-than-metrics-interval */ -}}
{{- if le $look_back $metrics_interval -}}
{{- fail (printf "%v: autoscaling.look_back_period_s %v must be longer than autoscaling.metrics_interval_s %v" $where $look_back $metrics_interval) -}}
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
{{- /* max-replicas-fit-group */ -}}
{{- if and $gpu $group_found $capacity (gt $scale_max $capacity) -}}
{{- fail (printf "%v: autoscaling.max_replicas %v replicas of %v GPUs each are more than worker group %q can ever hold (%v, with gpusPerWorker %v x maxReplicas %v); lower autoscaling.max_replicas or raise the group's maxReplicas" $where $scale_max $gpus $group $capacity $per_node $max_replicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}
