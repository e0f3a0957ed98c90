{{/* Names, labels and the pieces every role's pod shares. */}}

{{- define "kvgate.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* kvgate.component: (dict "root" $ "component" "router") -> "<fullname>-router" */}}
{{- define "kvgate.componentName" -}}
{{- printf "%s-%s" (include "kvgate.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvgate.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kvgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "kvgate.selectorLabels" . }}
app.kubernetes.io/part-of: kvgate
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{- define "kvgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kvgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvgate.tokenSecretName" -}}
{{- default (printf "%s-internal-token" (include "kvgate.fullname" .)) .Values.internal.auth.existingSecret -}}
{{- end -}}

{{- define "kvgate.modelClaimName" -}}
{{- default (printf "%s-models" (include "kvgate.fullname" .)) .Values.model.pvc.claimName -}}
{{- end -}}

{{/* Does this component run the model (and so need weights and, with cuda, a GPU)? */}}
{{- define "kvgate.runsModel" -}}
{{- if has .component (list "serve" "prefill" "decode") -}}true{{- end -}}
{{- end -}}

{{/* Backend flag value. */}}
{{- define "kvgate.backend" -}}
{{- if eq .Values.backend "cuda" -}}cuda:0{{- else -}}cpu{{- end -}}
{{- end -}}

{{/* The KV manager's internal address as the other roles dial it. */}}
{{- define "kvgate.kvManagerAddress" -}}
{{- printf "%s:%d" (include "kvgate.componentName" (dict "root" . "component" "kv-manager")) (int .Values.internal.port) -}}
{{- end -}}

{{/* Flags of the model-running roles (serve, prefill, decode) and the router (tokenizer). */}}
{{- define "kvgate.modelArgs" -}}
{{- $v := .root.Values -}}
- --model={{ $v.model.path }}
{{- if ne .component "router" }}
- --backend={{ include "kvgate.backend" .root }}
{{- if $v.kvPool.pages }}
- --kv-pages={{ int $v.kvPool.pages }}
{{- else }}
- --kv-sequences={{ int $v.kvPool.sequences }}
{{- end }}
- --page-tokens={{ int $v.kvPool.pageTokens }}
- --kv-cache-dtype={{ $v.kvPool.dtype | default "auto" }}
{{- with $v.model.gates.fastKvzip }}
- --fast-kvzip-gate={{ . }}
{{- end }}
{{- with $v.model.gates.attentionGate }}
- --attention-gate={{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Flags of the KV manager (also part of serve). */}}
{{- define "kvgate.managerArgs" -}}
{{- $v := .Values -}}
- --default-policy={{ $v.eviction.defaultPolicy }}
{{- if $v.eviction.defaultKeepRatio }}
- --default-keep-ratio={{ $v.eviction.defaultKeepRatio }}
{{- end }}
- --heartbeat-ms={{ int $v.kvManager.heartbeatMs }}
- --worker-timeout-ms={{ int $v.kvManager.workerTimeoutMs }}
- --lease-ttl-ms={{ int $v.kvManager.leaseTtlMs }}
{{- end -}}

{{/* Does this component mount the public TLS Secret? serve and the router; with internal
mtls the router's one TLS configuration is the internal certificate instead. */}}
{{- define "kvgate.publicTls" -}}
{{- $v := .root.Values -}}
{{- if and $v.tls.enabled (or (eq .component "serve") (and (eq .component "router") (ne $v.internal.auth.mode "mtls"))) -}}true{{- end -}}
{{- end -}}

{{/* Flags every role shares: metrics, drain, public TLS. */}}
{{- define "kvgate.commonArgs" -}}
{{- $v := .root.Values -}}
- --host=0.0.0.0
{{- if $v.metrics.enabled }}
- --metrics-port={{ int $v.metrics.port }}
- --metrics-host=0.0.0.0
{{- end }}
- --shutdown-grace-ms={{ int $v.shutdownGraceMs }}
{{- if eq (include "kvgate.publicTls" .) "true" }}
- --tls-cert=/etc/kvgate/tls/tls.crt
- --tls-key=/etc/kvgate/tls/tls.key
{{- end }}
{{- if and $v.clientToken.existingSecret (has .component (list "serve" "router")) }}
- --token-file=/etc/kvgate/client-token/token
{{- end }}
{{- end -}}

{{/* Flags of the internal listener and its authentication (split roles). kv-manager,
prefill and decode serve only internal services, on --port; every component presents the
internal token (or its certificate, mtls) when it calls another. */}}
{{- define "kvgate.internalArgs" -}}
{{- $v := .root.Values -}}
{{- if has .component (list "kv-manager" "prefill" "decode") }}
- --port={{ int $v.internal.port }}
{{- end }}
{{- if eq $v.internal.auth.mode "token" }}
- --internal-token-file=/etc/kvgate/internal-token/token
{{- else if eq $v.internal.auth.mode "mtls" }}
- --tls-cert=/etc/kvgate/internal-tls/tls.crt
- --tls-key=/etc/kvgate/internal-tls/tls.key
- --tls-ca=/etc/kvgate/internal-tls/ca.crt
{{- else }}
- --insecure-internal
{{- end }}
{{- end -}}

{{/* Does the probed port speak TLS? kubelet's gRPC probes are plaintext only, so such a
port gets a TCP probe instead. */}}
{{- define "kvgate.probedPortTls" -}}
{{- $v := .root.Values -}}
{{- if eq .component "serve" -}}
{{- if $v.tls.enabled }}true{{ end -}}
{{- else if eq .component "router" -}}
{{- if or $v.tls.enabled (eq $v.internal.auth.mode "mtls") }}true{{ end -}}
{{- else -}}
{{- if eq $v.internal.auth.mode "mtls" }}true{{ end -}}
{{- end -}}
{{- end -}}

{{/* The container's ports. */}}
{{- define "kvgate.ports" -}}
{{- $v := .root.Values -}}
{{- if has .component (list "serve" "router") }}
- name: grpc
  containerPort: {{ int $v.service.port }}
  protocol: TCP
{{- end }}
{{- if has .component (list "kv-manager" "prefill" "decode") }}
- name: internal
  containerPort: {{ int $v.internal.port }}
  protocol: TCP
{{- end }}
{{- if $v.metrics.enabled }}
- name: metrics
  containerPort: {{ int $v.metrics.port }}
  protocol: TCP
{{- end }}
{{- end -}}

{{/* Native gRPC probes (grpc.health.v1, which needs no token) on the port that carries
it; a TCP probe where that port speaks TLS (kubelet's gRPC probe cannot). */}}
{{- define "kvgate.probes" -}}
{{- $v := .root.Values -}}
{{- $port := ternary (int $v.service.port) (int $v.internal.port) (has .component (list "serve" "router")) -}}
{{- $kind := ternary "tcpSocket" "grpc" (eq (include "kvgate.probedPortTls" .) "true") -}}
{{- range $probe := list "startup" "liveness" "readiness" }}
{{- $p := index $v.probes $probe }}
{{ $probe }}Probe:
  {{ $kind }}:
    port: {{ $port }}
  periodSeconds: {{ int $p.periodSeconds }}
  failureThreshold: {{ int $p.failureThreshold }}
  {{- with $p.timeoutSeconds }}
  timeoutSeconds: {{ int . }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Volume mounts and volumes: /tmp (the root filesystem is read-only), weights, secrets. */}}
{{- define "kvgate.volumeMounts" -}}
{{- $v := .root.Values -}}
- name: tmp
  mountPath: /tmp
{{- if and (include "kvgate.runsModel" . | eq "true" | or (eq .component "router")) (ne $v.model.source "image") }}
- name: models
  mountPath: {{ $v.model.mountPath }}
  readOnly: true
{{- end }}
{{- if eq (include "kvgate.publicTls" .) "true" }}
- name: tls
  mountPath: /etc/kvgate/tls
  readOnly: true
{{- end }}
{{- if and $v.clientToken.existingSecret (has .component (list "serve" "router")) }}
- name: client-token
  mountPath: /etc/kvgate/client-token
  readOnly: true
{{- end }}
{{- if ne .component "serve" }}
{{- if eq $v.internal.auth.mode "token" }}
- name: internal-token
  mountPath: /etc/kvgate/internal-token
  readOnly: true
{{- else if eq $v.internal.auth.mode "mtls" }}
- name: internal-tls
  mountPath: /etc/kvgate/internal-tls
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "kvgate.volumes" -}}
{{- $v := .root.Values -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- if and (include "kvgate.runsModel" . | eq "true" | or (eq .component "router")) (ne $v.model.source "image") }}
{{- if eq $v.model.source "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "kvgate.modelClaimName" .root }}
    readOnly: true
{{- else }}
- name: models
  emptyDir:
    sizeLimit: {{ $v.model.initContainer.sizeLimit }}
{{- end }}
{{- end }}
{{- if eq (include "kvgate.publicTls" .) "true" }}
- name: tls
  secret:
    secretName: {{ $v.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- if and $v.clientToken.existingSecret (has .component (list "serve" "router")) }}
- name: client-token
  secret:
    secretName: {{ $v.clientToken.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if ne .component "serve" }}
{{- if eq $v.internal.auth.mode "token" }}
- name: internal-token
  secret:
    secretName: {{ include "kvgate.tokenSecretName" .root }}
    defaultMode: 0440
{{- else if eq $v.internal.auth.mode "mtls" }}
- name: internal-tls
  secret:
    secretName: {{ $v.tls.internalSecretName }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end -}}

{{/* The init container that fills the model emptyDir (model.source: initContainer). */}}
{{- define "kvgate.initContainers" -}}
{{- $v := .root.Values -}}
{{- if and (include "kvgate.runsModel" . | eq "true" | or (eq .component "router")) (eq $v.model.source "initContainer") }}
initContainers:
  - name: fetch-model
    image: {{ $v.model.initContainer.image }}
    command:
      {{- toYaml $v.model.initContainer.command | nindent 6 }}
    env:
      - name: KVGATE_MODEL_DIR
        value: {{ $v.model.mountPath | quote }}
    securityContext:
      {{- toYaml $v.securityContext | nindent 6 }}
    volumeMounts:
      - name: models
        mountPath: {{ $v.model.mountPath }}
      - name: tmp
        mountPath: /tmp
{{- end }}
{{- end -}}

{{/* GPU request/limit merged into the role's resources. */}}
{{- define "kvgate.resources" -}}
{{- $v := .root.Values -}}
{{- $res := deepCopy .resources -}}
{{- if and (eq $v.backend "cuda") (include "kvgate.runsModel" . | eq "true") (gt (int .gpus) 0) -}}
{{- $limits := default (dict) $res.limits -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $res "limits" $limits -}}
{{- $requests := default (dict) $res.requests -}}
{{- $_ := set $requests "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $res "requests" $requests -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* What the schema cannot say: the three ports differ. */}}
{{- define "kvgate.validate" -}}
{{- $v := .Values -}}
{{- $ports := list (int $v.service.port) (int $v.internal.port) -}}
{{- if $v.metrics.enabled -}}{{- $ports = append $ports (int $v.metrics.port) -}}{{- end -}}
{{- if ne (len $ports) (len (uniq $ports)) -}}
{{- fail (printf "service.port, internal.port and metrics.port must differ (got %v)" $ports) -}}
{{- end -}}
{{- end -}}
