{{/* The pod template shared by the Deployment and the Pool. */}}
{{- define "task-executor.podTemplate" -}}
{{- $te := include "task-executor.sidecarArgs" . | fromYaml }}
{{- $podSC := deepCopy .Values.podSecurityContext -}}
metadata:
  labels:
    {{- include "task-executor.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $annotations := deepCopy (.Values.podAnnotations | default dict) }}
  {{- if dig "podAnnotations" true (.Values.metrics | default dict) }}
  {{- $cfg := include "task-executor.config" $te | fromYaml }}
  {{- $_ := set $annotations "prometheus.io/scrape" "true" }}
  {{- $_ := set $annotations "prometheus.io/port" (include "task-executor.scalar" $cfg.port) }}
  {{- $_ := set $annotations "prometheus.io/path" "/metrics" }}
  {{- end }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "task-executor.serviceAccountName" . }}
  # No token for the main container (it runs untrusted code); the agent container mounts
  # one itself when it talks to the API.
  automountServiceAccountToken: false
  {{- if eq .Values.mode "sidecar" }}
  # The agent must see the main container's processes to enter their namespaces.
  shareProcessNamespace: true
  {{- end }}
  {{- with $podSC }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    {{- if .Values.main.enabled }}
    {{- $m := .Values.main }}
    - name: {{ $m.name }}
      image: {{ printf "%s:%s" $m.image.repository (toString $m.image.tag) | quote }}
      imagePullPolicy: {{ $m.image.pullPolicy }}
      {{- with $m.command }}
      command: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $m.args }}
      args: {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        {{- include "task-executor.mainEnv" $te | nindent 8 }}
        {{- with $m.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $m.ports }}
      ports: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $m.volumeMounts }}
      volumeMounts: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $m.resources }}
      resources: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $m.securityContext }}
      securityContext: {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- else if eq .Values.mode "sidecar" }}
    {{- fail "task-executor: sidecar mode needs the main container (main.enabled: true)" }}
    {{- end }}
    {{- include "task-executor.sidecar" $te | nindent 4 }}
  volumes:
    {{- include "task-executor.volumes" $te | nindent 4 }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
