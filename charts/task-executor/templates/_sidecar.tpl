{{- /*
Reusable pieces for putting the task-executor agent into any pod template, e.g. the
template of an OpenSandbox Pool or BatchSandbox in another chart (add this chart as a
dependency with `workload: None`; named templates are shared with the parent chart).

Every template here takes one dict:
  mode               host | sidecar | container                        (required)
  executor           overrides of the `executor` values of this chart   (optional)
  mainContainerName  the workload container, for sidecar mode           (default "main")
  appVersion         image tag used when executor.image.tag is empty    (optional)

  containers:
    - name: main
      env: {{- include "task-executor.mainEnv" $te | nindent 8 }}
      volumeMounts: {{- include "task-executor.mainVolumeMounts" $te | nindent 8 }}
    {{- include "task-executor.sidecar" $te | nindent 4 }}
  volumes: {{- include "task-executor.volumes" $te | nindent 4 }}
  # sidecar mode also needs, on the pod spec:  shareProcessNamespace: true
*/ -}}

{{/* Defaults of `executor`; values.yaml repeats them (tests/chart.rs checks they agree). */}}
{{- define "task-executor.executorDefaults" -}}
image:
  repository: task-executor
  tag: ""
  pullPolicy: IfNotPresent
port: 5758
dataDir: /var/lib/sandbox/tasks
dataVolume:
  emptyDir: {}
logLevel: info
logFormat: json
reconcileInterval: 500ms
stopGracePeriod: 10s
maxConcurrentTasks: 0
maxBodyBytes: null
maxLogBytes: null
watchTasks: false
criSocket: /var/run/containerd/containerd.sock
privileged: false
sidecarJoinCgroup: false
sidecarRunAsTargetUser: false
extraArgs: []
extraEnv: []
resources:
  requests:
    cpu: 50m
    memory: 64Mi
  limits:
    memory: 256Mi
securityContext: {}
{{- end }}

{{/* The caller's executor settings merged over the defaults, as YAML; checks the mode. */}}
{{- define "task-executor.config" -}}
{{- if not (has .mode (list "host" "sidecar" "container")) }}
{{- fail (printf "task-executor: mode must be host, sidecar or container, not %q" (toString .mode)) }}
{{- end }}
{{- $defaults := include "task-executor.executorDefaults" . | fromYaml }}
{{- toYaml (mergeOverwrite $defaults (deepCopy (.executor | default dict))) }}
{{- end }}

{{/* A value as text; numbers come back from fromYaml as float64, which would print
     1048576 as 1.048576e+06. */}}
{{- define "task-executor.scalar" -}}
{{- if kindIs "float64" . }}{{ int64 . }}{{ else }}{{ toString . }}{{ end }}
{{- end }}

{{/* Per-mode security context of the agent container. */}}
{{- define "task-executor.securityContext" -}}
{{- $e := include "task-executor.config" . | fromYaml }}
{{- $sc := dict }}
{{- if eq .mode "host" }}
{{- /* Tasks run in this container as the unprivileged image user; nothing more is needed. */}}
{{- $sc = dict "runAsNonRoot" true "runAsUser" 65532 "runAsGroup" 65532 "allowPrivilegeEscalation" false "readOnlyRootFilesystem" true "capabilities" (dict "drop" (list "ALL")) "seccompProfile" (dict "type" "RuntimeDefault") }}
{{- else if eq .mode "sidecar" }}
{{- /* Entering the main container's namespaces needs root with SYS_ADMIN (setns), SYS_CHROOT
       (mount namespace) and SYS_PTRACE (other containers' /proc/PID). The default capability
       set is kept rather than dropped because tasks inherit it, and root tasks without e.g.
       CHOWN or DAC_OVERRIDE would fail in surprising ways. allowPrivilegeEscalation is left
       unset: the API server rejects false together with SYS_ADMIN. */}}
{{- $sc = dict "runAsNonRoot" false "runAsUser" 0 "runAsGroup" 0 "readOnlyRootFilesystem" true }}
{{- if $e.privileged }}
{{- $_ := set $sc "privileged" true }}
{{- else }}
{{- $_ := set $sc "capabilities" (dict "add" (list "SYS_ADMIN" "SYS_PTRACE" "SYS_CHROOT")) }}
{{- end }}
{{- else }}
{{- /* The CRI socket is root:root 0660, so uid 0 is needed to connect; as its owner, root
       needs no capability (DAC_OVERRIDE included) for that, so all are dropped. */}}
{{- $sc = dict "runAsNonRoot" false "runAsUser" 0 "runAsGroup" 0 "allowPrivilegeEscalation" false "readOnlyRootFilesystem" true "capabilities" (dict "drop" (list "ALL")) "seccompProfile" (dict "type" "RuntimeDefault") }}
{{- end }}
{{- toYaml (mergeOverwrite $sc ($e.securityContext | default dict)) }}
{{- end }}

{{/* The agent container, as one item of a `containers:` list. */}}
{{- define "task-executor.sidecar" -}}
{{- $e := include "task-executor.config" . | fromYaml }}
{{- $tag := $e.image.tag | default .appVersion | required "task-executor: set executor.image.tag" }}
{{- $args := list }}
{{- if and (eq .mode "sidecar") $e.sidecarJoinCgroup }}{{ $args = append $args "--sidecar-join-cgroup" }}{{ end }}
{{- if and (eq .mode "sidecar") $e.sidecarRunAsTargetUser }}{{ $args = append $args "--sidecar-run-as-target-user" }}{{ end }}
{{- $args = concat $args ($e.extraArgs | default list) -}}
- name: task-executor
  image: {{ printf "%s:%s" $e.image.repository (toString $tag) | quote }}
  imagePullPolicy: {{ $e.image.pullPolicy }}
  # The image's entrypoint, spelled out: the init runs the agent (args go to the agent)
  # and restarts it if it dies, so an agent crash doesn't end the container's tasks.
  command: ["task-executor", "init", "--"]
  {{- with $args }}
  args: {{- toYaml . | nindent 4 }}
  {{- end }}
  # Configured through the environment: every agent flag reads its env var.
  env:
    - name: LISTEN_ADDR
      value: {{ printf "0.0.0.0:%s" (include "task-executor.scalar" $e.port) | quote }}
    - name: DATA_DIR
      value: {{ $e.dataDir | quote }}
    - name: LOG_LEVEL
      value: {{ $e.logLevel | quote }}
    - name: LOG_FORMAT
      value: {{ $e.logFormat | quote }}
    - name: RECONCILE_INTERVAL
      value: {{ $e.reconcileInterval | quote }}
    - name: STOP_GRACE_PERIOD
      value: {{ $e.stopGracePeriod | quote }}
    - name: MAX_CONCURRENT_TASKS
      value: {{ include "task-executor.scalar" $e.maxConcurrentTasks | quote }}
    {{- if not (kindIs "invalid" $e.maxBodyBytes) }}
    - name: MAX_BODY_BYTES
      value: {{ include "task-executor.scalar" $e.maxBodyBytes | quote }}
    {{- end }}
    {{- if not (kindIs "invalid" $e.maxLogBytes) }}
    - name: MAX_LOG_BYTES
      value: {{ include "task-executor.scalar" $e.maxLogBytes | quote }}
    {{- end }}
    {{- if eq .mode "sidecar" }}
    - name: ENABLE_SIDECAR_MODE
      value: "true"
    - name: MAIN_CONTAINER_NAME
      value: {{ .mainContainerName | default "main" | quote }}
    {{- end }}
    {{- if eq .mode "container" }}
    - name: ENABLE_CONTAINER_MODE
      value: "true"
    - name: CRI_SOCKET
      value: {{ $e.criSocket | quote }}
    {{- end }}
    {{- if $e.watchTasks }}
    - name: WATCH_TASKS
      value: "true"
    {{- end }}
    # Identity of this pod, for reading its own Pod (main container, volumes) and Tasks.
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: POD_NAMESPACE
      valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
    - name: POD_UID
      valueFrom: {fieldRef: {fieldPath: metadata.uid}}
    {{- with $e.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: task-api
      containerPort: {{ include "task-executor.scalar" $e.port }}
      protocol: TCP
  livenessProbe:
    httpGet: {path: /health, port: task-api}
    periodSeconds: 10
    timeoutSeconds: 3
    failureThreshold: 3
  readinessProbe:
    httpGet: {path: /readyz, port: task-api}
    periodSeconds: 5
    timeoutSeconds: 3
    failureThreshold: 3
  resources: {{- toYaml $e.resources | nindent 4 }}
  securityContext: {{- include "task-executor.securityContext" . | nindent 4 }}
  volumeMounts:
    - name: task-executor-data
      mountPath: {{ $e.dataDir | quote }}
    {{- if eq .mode "container" }}
    - name: cri-socket
      mountPath: {{ $e.criSocket | quote }}
    {{- end }}
    {{- if eq .mode "host" }}
    # Host-mode tasks run here, on a read-only root file system: give them a writable /tmp.
    - name: task-executor-tmp
      mountPath: /tmp
    {{- end }}
{{- end }}

{{/* The pod volumes the agent needs, as items of a `volumes:` list. */}}
{{- define "task-executor.volumes" -}}
{{- $e := include "task-executor.config" . | fromYaml -}}
- name: task-executor-data
  {{- toYaml $e.dataVolume | nindent 2 }}
{{- if eq .mode "container" }}
- name: cri-socket
  hostPath:
    path: {{ $e.criSocket | quote }}
    type: Socket
{{- end }}
{{- if eq .mode "host" }}
- name: task-executor-tmp
  emptyDir: {}
{{- end }}
{{- end }}

{{/* Env items for the main container: how the agent's fallback lookup finds it. */}}
{{- define "task-executor.mainEnv" -}}
- name: SANDBOX_MAIN_CONTAINER
  value: {{ .mainContainerName | default "main" | quote }}
{{- end }}

{{/* volumeMounts items for the main container. In sidecar mode the data dir is mounted at
     the same path as in the agent, so paths the agent hands to a task resolve in both. */}}
{{- define "task-executor.mainVolumeMounts" -}}
{{- $e := include "task-executor.config" . | fromYaml }}
{{- if eq .mode "sidecar" }}
- name: task-executor-data
  mountPath: {{ $e.dataDir | quote }}
{{- end }}
{{- end }}
