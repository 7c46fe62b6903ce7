{{/*
The pod template of a Ray pod, the head's or a worker group's, from one place so both get the
same volumes, environment and security settings. Called with a dict:
  root:      the chart's top context
  pod:       rayCluster.head or one rayCluster.workerGroups[] entry
  container: the container's name
  gpus:      GPUs of the pod (0 for the head and CPU groups)
  resources: the container's resources
  ports:     the container's ports
Nothing in it depends on the catalog, so a catalog change never changes a pod template (it
changes serveConfigV2 only, which KubeRay applies in place).
*/}}
{{- define "tokenmart.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $cluster := $root.Values.rayCluster -}}
{{- $pod := .pod -}}
{{- $gpu := gt (int .gpus) 0 -}}
{{- $labels := merge (include "tokenmart.rayPodLabels" $root | fromYaml) ($pod.labels | default dict) -}}
{{- $annotations := merge (deepCopy ($pod.annotations | default dict)) ($cluster.podAnnotations | default dict) -}}
{{- $podSecurity := ternary $cluster.podSecurityContext $pod.podSecurityContext (kindIs "invalid" $pod.podSecurityContext) -}}
{{- $security := ternary $cluster.securityContext $pod.securityContext (kindIs "invalid" $pod.securityContext) -}}
{{- $volumes := include "tokenmart.spoolVolume" $root | fromYamlArray -}}
{{- $mounts := list (dict "name" "spool" "mountPath" "/var/lib/tokenmart/spool") -}}
{{- $env := include "tokenmart.rayEnv" $root | fromYamlArray -}}
{{- /* /dev/shm: vLLM's tensor-parallel workers and NCCL exchange through it. */ -}}
{{- $shm := $pod.sharedMemory | default dict -}}
{{- if ternary $gpu $shm.enabled (kindIs "invalid" $shm.enabled) -}}
{{- $size := ternary $cluster.sharedMemory.sizeLimit $shm.sizeLimit (kindIs "invalid" $shm.sizeLimit) -}}
{{- $volumes = append $volumes (dict "name" "dshm" "emptyDir" (dict "medium" "Memory" "sizeLimit" $size)) -}}
{{- $mounts = append $mounts (dict "name" "dshm" "mountPath" "/dev/shm") -}}
{{- end -}}
{{- /* The model cache: weights downloaded once, shared by every replica of the group. */ -}}
{{- $cache := $cluster.modelCache -}}
{{- if and (ne $cache.type "none") (ternary $gpu $pod.modelCache (kindIs "invalid" $pod.modelCache)) -}}
{{- if eq $cache.type "pvc" -}}
{{- $claim := $cache.pvc.existingClaim | default (printf "%s-model-cache" (include "tokenmart.fullname" $root)) -}}
{{- $volumes = append $volumes (dict "name" "model-cache" "persistentVolumeClaim" (dict "claimName" $claim)) -}}
{{- else -}}
{{- $volumes = append $volumes (dict "name" "model-cache" "hostPath" (dict "path" $cache.hostPath.path "type" "DirectoryOrCreate")) -}}
{{- end -}}
{{- $mounts = append $mounts (dict "name" "model-cache" "mountPath" $cache.mountPath) -}}
{{- $env = append $env (dict "name" "HF_HOME" "value" (printf "%s/huggingface" $cache.mountPath)) -}}
{{- $env = append $env (dict "name" "VLLM_CACHE_ROOT" "value" (printf "%s/vllm" $cache.mountPath)) -}}
{{- end -}}
{{- /* LoRA adapters, read-only where the catalog's adapter sources point. */ -}}
{{- $adapters := $cluster.adapters -}}
{{- if and (ne $adapters.type "none") (ternary $gpu $pod.adapters (kindIs "invalid" $pod.adapters)) -}}
{{- if eq $adapters.type "pvc" -}}
{{- $volumes = append $volumes (dict "name" "adapters" "persistentVolumeClaim" (dict "claimName" $adapters.existingClaim "readOnly" true)) -}}
{{- else -}}
{{- $volumes = append $volumes (dict "name" "adapters" "hostPath" (dict "path" $adapters.hostPath "type" "Directory")) -}}
{{- end -}}
{{- $mounts = append $mounts (dict "name" "adapters" "mountPath" $adapters.mountPath "readOnly" true) -}}
{{- end -}}
{{- $volumes = concat $volumes ($pod.volumes | default list) -}}
{{- $mounts = concat $mounts ($pod.volumeMounts | default list) -}}
{{- $env = concat $env ($pod.env | default list) -}}
metadata:
  labels:
    {{- toYaml $labels | nindent 4 }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $pod.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $pod.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $pod.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $podSecurity }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "tokenmart.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- with $security }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        {{- toYaml $env | nindent 8 }}
      {{- with $pod.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        {{- toYaml .ports | nindent 8 }}
      resources:
        {{- toYaml .resources | nindent 8 }}
      volumeMounts:
        {{- toYaml $mounts | nindent 8 }}
  volumes:
    {{- toYaml $volumes | nindent 4 }}
  {{- with $pod.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $pod.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $pod.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $pod.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/*
The head's logical CPUs (rayStartParams num-cpus), or empty for Ray's default (the pod's CPU
limit). hasKey/kindIs rather than `with`, which would drop an explicit 0. Decided from the
worker groups, not the catalog, so that a catalog change keeps the cluster spec.
*/}}
{{- define "tokenmart.headNumCpus" -}}
{{- $head := .Values.rayCluster.head -}}
{{- if and (hasKey $head "numCpus") (not (kindIs "invalid" $head.numCpus)) -}}
{{- $head.numCpus | toString -}}
{{- else -}}
{{- range .Values.rayCluster.workerGroups -}}
{{- if gt (int .gpusPerWorker) 0 -}}0{{- break -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Security settings of the Redis pods: the `restricted` Pod Security level (redis images run as uid 999). */}}
{{- define "tokenmart.redisPodSecurityContext" -}}
runAsNonRoot: true
runAsUser: 999
runAsGroup: 999
fsGroup: 999
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "tokenmart.restrictedContainerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end -}}
