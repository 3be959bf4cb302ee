{{/*
Names, labels, and the two helpers the RayService is built from: `trisect.pools` (which worker
groups exist for the mode) and `trisect.workerGroup` (one group from its symmetric pool values).
*/}}

{{- define "trisect.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "trisect.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "trisect.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trisect.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "trisect.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "trisect.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "trisect.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/* Pools (worker groups) of the mode, in order; role switching folds prefill + decode into llm. */}}
{{- define "trisect.pools" -}}
{{- $mode := .Values.config.mode -}}
{{- $pools := dict "epd" (list "encode" "prefill" "decode") "pd" (list "prefill" "decode") "aggregated" (list "prefill") -}}
{{- $list := get $pools $mode -}}
{{- if and .Values.roleSwitching.enabled (ne $mode "aggregated") -}}
{{- $list = append (without $list "prefill" "decode") "llm" -}}
{{- end -}}
{{- join "," $list -}}
{{- end -}}

{{/* Stages (Serve deployments) of the mode, as ClusterConfig.stage_names() has them. */}}
{{- define "trisect.stages" -}}
{{- $stages := dict "epd" "ingress,encode,prefill,decode" "pd" "ingress,prefill,decode" "aggregated" "ingress,aggregated" -}}
{{- get $stages .Values.config.mode -}}
{{- end -}}

{{/* The pool a stage's replicas need (cluster/config.py POOL_OF, plus llm under role switching). */}}
{{- define "trisect.poolOf" -}}
{{- $stage := .stage -}}
{{- if eq $stage "aggregated" -}}prefill
{{- else if and .root.Values.roleSwitching.enabled (has $stage (list "prefill" "decode")) -}}llm
{{- else -}}{{ $stage }}
{{- end -}}
{{- end -}}

{{/* The Redis URL trisect gets; a password is left as ${TRISECT_REDIS_PASSWORD}, expanded in the pod. */}}
{{- define "trisect.redisUrl" -}}
{{- if eq .Values.redis.mode "builtin" -}}
{{- printf "redis://:${TRISECT_REDIS_PASSWORD}@%s-redis:6379/0" (include "trisect.fullname" .) -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{- define "trisect.redisSecret" -}}
{{- if eq .Values.redis.mode "builtin" -}}
{{- dict "name" (default (printf "%s-redis" (include "trisect.fullname" .)) .Values.redis.builtin.existingSecret) "key" "password" | toJson -}}
{{- else if .Values.redis.external.passwordSecret.name -}}
{{- .Values.redis.external.passwordSecret | toJson -}}
{{- else -}}
{{- dict | toJson -}}
{{- end -}}
{{- end -}}

{{/* Env of every Ray container: the Redis password (for ${TRISECT_REDIS_PASSWORD}) and the cache. */}}
{{- define "trisect.rayEnv" -}}
{{- $secret := include "trisect.redisSecret" . | fromJson -}}
- name: TRISECT_CACHE
  value: {{ .Values.config.cache_dir | default "/home/ray/.cache/trisect" | quote }}
{{- if $secret.name }}
- name: TRISECT_REDIS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ $secret.name | quote }}, key: {{ $secret.key | quote }}}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod and container hardening shared by every Ray pod (Ray's image runs as ray, uid 1000, gid 100). */}}
{{- define "trisect.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 100
fsGroup: 100
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "trisect.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .Values.readOnlyRootFilesystem }}
runAsNonRoot: true
capabilities: {drop: [ALL]}
{{- end -}}

{{/* What Ray writes to: the session dir (/tmp/ray), plasma (/dev/shm), ~/.ray (token), ~/.cache. */}}
{{- define "trisect.rayVolumes" -}}
- name: tmp
  emptyDir: {}
- name: shm
  emptyDir: {medium: Memory, sizeLimit: {{ printf "%dMi" (add .objectStoreMemoryMib 512) }}}
- name: ray-home
  emptyDir: {}
- name: cache
  emptyDir: {}
{{- with .root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "trisect.rayVolumeMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: shm, mountPath: /dev/shm}
- {name: ray-home, mountPath: /home/ray/.ray}
- {name: cache, mountPath: /home/ray/.cache}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* rayStartParams values are strings; `resources` is JSON quoted once more, as KubeRay documents. */}}
{{- define "trisect.rayStartParams" -}}
object-store-memory: {{ mul .objectStoreMemoryMib 1048576 | toString | quote }}
resources: {{ printf "%q" (toJson .resources) | squote }}
{{- range $k, $v := .extra }}
{{ $k }}: {{ $v | quote }}
{{- end }}
{{- end -}}

{{/*
One worker group from a pool's values: `dict "root" $ "name" "decode"`. Every pool renders
through here, so the groups differ only in their values.
*/}}
{{- define "trisect.workerGroup" -}}
{{- $root := .root -}}
{{- $name := .name -}}
{{- $p := get $root.Values.pools $name -}}
{{- if not (and (le (int $p.minReplicas) (int $p.replicas)) (le (int $p.replicas) (int $p.maxReplicas))) -}}
{{- fail (printf "pools.%s: need minReplicas <= replicas <= maxReplicas (got %v <= %v <= %v)" $name $p.minReplicas $p.replicas $p.maxReplicas) -}}
{{- end -}}
- groupName: {{ $name }}
  replicas: {{ $p.replicas }}
  minReplicas: {{ $p.minReplicas }}
  maxReplicas: {{ $p.maxReplicas }}
  rayStartParams:
    {{- include "trisect.rayStartParams" (dict "objectStoreMemoryMib" $p.objectStoreMemoryMib "resources" (dict (printf "%s_pool" $name) $p.slotsPerPod) "extra" $p.rayStartParams) | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "trisect.selectorLabels" $root | nindent 8 }}
        trisect.io/pool: {{ $name }}
    spec:
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
      securityContext:
        {{- include "trisect.podSecurityContext" $root | nindent 8 }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $p.nodeSelector }}
      nodeSelector: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $p.tolerations }}
      tolerations: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $p.affinity }}
      affinity: {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "trisect.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          env:
            {{- include "trisect.rayEnv" $root | nindent 12 }}
          ports:
            - {containerPort: 8080, name: metrics}
          resources:
            requests:
              {{- toYaml $p.resources.requests | nindent 14 }}
            limits:
              {{- toYaml $p.resources.limits | nindent 14 }}
              {{- if gt (int $p.gpus) 0 }}
              nvidia.com/gpu: {{ $p.gpus }}
              {{- end }}
          securityContext:
            {{- include "trisect.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            {{- include "trisect.rayVolumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "trisect.rayVolumes" (dict "root" $root "objectStoreMemoryMib" $p.objectStoreMemoryMib) | nindent 8 }}
{{- end -}}
