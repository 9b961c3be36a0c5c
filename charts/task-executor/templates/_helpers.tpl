{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "task-executor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name for every object of this chart. */}}
{{- define "task-executor.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "task-executor.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "task-executor.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "task-executor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "task-executor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "task-executor.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "task-executor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "task-executor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "task-executor.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The arguments this chart passes to the templates of _sidecar.tpl. */}}
{{- define "task-executor.sidecarArgs" -}}
{{- $auth := merge (dict "generatedSecret" (include "task-executor.authSecretName" .)) (deepCopy (.Values.auth | default dict)) }}
{{- toYaml (dict "mode" .Values.mode "executor" .Values.executor "mainContainerName" .Values.main.name "appVersion" .Chart.AppVersion "auth" $auth "tls" .Values.tls) }}
{{- end }}

{{/* The Secret the chart generates for token auth (when no existingSecret is given). */}}
{{- define "task-executor.authSecretName" -}}
{{- printf "%s-auth" (include "task-executor.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Cluster-scoped names carry the namespace: releases of the same name may exist in
     several namespaces. */}}
{{- define "task-executor.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "task-executor.fullname" .) }}
{{- end }}
