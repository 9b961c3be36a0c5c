{{- /*
Reusable pieces for putting the task-executor agent into any pod template, e.g. the
template of an OpenSandbox Pool or BatchSandbox in another chart (add this chart as a
dependency with `workload: None`; named templates are shared with the parent chart).

Every template here takes one dict:
  mode               host | sidecar | container                        (required)
  executor           overrides of the `executor` values of this chart   (optional)
  auth               the `auth` values of this chart (mode, existingSecret, secretKey)
                     (optional; default mode none)
  tls                the `tls` values of this chart (secretName)         (optional)
  mainContainerName  the workload container, for sidecar mode           (default "main")
  appVersion         image tag used when executor.image.tag is empty    (optional)

  containers:
    - name: main
      env: {{- include "task-executor.mainEnv" $te | nindent 8 }}
    {{- include "task-executor.sidecar" $te | nindent 4 }}
  volumes: {{- include "task-executor.volumes" $te | nindent 4 }}
  # and on the pod spec:  automountServiceAccountToken: false  (the agent container gets
  # its own token when it needs one); sidecar mode also:  shareProcessNamespace: true
*/ -}}

{{/* Defaults of `executor`; values.yaml repeats them (tests/tools/chart.rs checks they agree). */}}
{{- define "task-executor.executorDefaults" -}}
image:
  repository: task-executor
  tag: ""
  pullPolicy: IfNotPresent
port: 5758
dataDir: /var/lib/sandbox/tasks
dataVolume:
  emptyDir:
    sizeLimit: 1Gi
logLevel: info
logFormat: json
reconcileInterval: 500ms
stopGracePeriod: 10s
hookTimeout: 0s
maxConcurrentTasks: 0
maxBodyBytes: null
maxLogBytes: null
taskPidsLimit: null
showTaskEnv: false
watchTasks: false
criSocket: /var/run/containerd/containerd.sock
privileged: false
taskRunAsUser: "65534"
taskUidRange: "100000-165535"
taskPolicy: baseline
taskHostPathAllow: []
taskImageAllow: []
sidecarJoinCgroup: false
sidecarRunAsTargetUser: true
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

{{/* The caller's auth settings over their defaults, as YAML; checks the mode. */}}
{{- define "task-executor.authConfig" -}}
{{- $a := mergeOverwrite (dict "mode" "none" "existingSecret" "" "secretKey" "tokens" "generatedSecret" "") (deepCopy (.auth | default dict)) }}
{{- if not (has $a.mode (list "none" "token" "kubernetes")) }}
{{- fail (printf "task-executor: auth.mode must be none, token or kubernetes, not %q" (toString $a.mode)) }}
{{- end }}
{{- toYaml $a }}
{{- end }}

{{/* "true" when the agent talks to the Kubernetes API (and so needs a token): sidecar
     and container mode read the own Pod, watchTasks reads Tasks, kubernetes auth sends
     reviews. */}}
{{- define "task-executor.needsApi" -}}
{{- $e := include "task-executor.config" . | fromYaml }}
{{- $auth := include "task-executor.authConfig" . | fromYaml }}
{{- if or (ne .mode "host") $e.watchTasks (eq $auth.mode "kubernetes") }}true{{ end }}
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
{{- if ne .mode "sidecar" }}
{{- /* Root owns the data dir (0700) and the credentials (0400), which tasks, running as
       `taskRunAsUser` or a uid of `taskUidRange`, can't read. Dropping to that user needs SETUID and SETGID, and
       stopping its processes KILL; nothing else (tests/root/isolation.rs runs the agent with
       exactly these). Container mode: the CRI socket is root:root 0660, so uid 0 connects
       as its owner with no capability, while a process task (as taskRunAsUser) can't. */}}
{{- $caps := dict "drop" (list "ALL") }}
{{- if or $e.taskRunAsUser $e.taskUidRange }}
{{- $_ := set $caps "add" (list "SETUID" "SETGID" "KILL") }}
{{- end }}
{{- $sc = dict "runAsNonRoot" false "runAsUser" 0 "runAsGroup" 0 "allowPrivilegeEscalation" false "readOnlyRootFilesystem" true "capabilities" $caps "seccompProfile" (dict "type" "RuntimeDefault") }}
{{- else }}
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
{{- end }}
{{- toYaml (mergeOverwrite $sc ($e.securityContext | default dict)) }}
{{- end }}

{{/* The agent container, as one item of a `containers:` list. */}}
{{- define "task-executor.sidecar" -}}
{{- $e := include "task-executor.config" . | fromYaml }}
{{- $auth := include "task-executor.authConfig" . | fromYaml }}
{{- $tls := (.tls | default dict).secretName }}
{{- $tag := $e.image.tag | default .appVersion | required "task-executor: set executor.image.tag" }}
{{- $args := list }}
{{- if and (eq .mode "sidecar") $e.sidecarJoinCgroup }}{{ $args = append $args "--sidecar-join-cgroup" }}{{ end }}
{{- if and (eq .mode "sidecar") (not $e.sidecarRunAsTargetUser) }}{{ $args = append $args "--sidecar-run-as-target-user=false" }}{{ end }}
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
    - name: HOOK_TIMEOUT
      value: {{ $e.hookTimeout | quote }}
    - name: MAX_CONCURRENT_TASKS
      value: {{ include "task-executor.scalar" $e.maxConcurrentTasks | quote }}
    {{- if $e.taskRunAsUser }}
    # Tasks in this container (host mode; `execMode: Local` in the others) run as this
    # user unless their securityContext says otherwise.
    - name: TASK_RUN_AS_USER
      value: {{ include "task-executor.scalar" $e.taskRunAsUser | quote }}
    {{- end }}
    {{- if $e.taskUidRange }}
    # Each of those tasks runs as a uid of its own from this range (unless its
    # securityContext says otherwise), so tasks can't reach each other's processes.
    - name: TASK_UID_RANGE
      value: {{ $e.taskUidRange | quote }}
    {{- end }}
    # What a request may ask for beyond the configured identity and places (docs/security.md:
    # "Task policy"): privileged, baseline or restricted.
    - name: TASK_POLICY
      value: {{ $e.taskPolicy | quote }}
    {{- with $e.taskHostPathAllow }}
    - name: TASK_HOST_PATH_ALLOW
      value: {{ join "," . | quote }}
    {{- end }}
    {{- with $e.taskImageAllow }}
    - name: TASK_IMAGE_ALLOW
      value: {{ join "," . | quote }}
    {{- end }}
    {{- if not (kindIs "invalid" $e.maxBodyBytes) }}
    - name: MAX_BODY_BYTES
      value: {{ include "task-executor.scalar" $e.maxBodyBytes | quote }}
    {{- end }}
    {{- if not (kindIs "invalid" $e.maxLogBytes) }}
    - name: MAX_LOG_BYTES
      value: {{ include "task-executor.scalar" $e.maxLogBytes | quote }}
    {{- end }}
    {{- if not (kindIs "invalid" $e.taskPidsLimit) }}
    # The most processes a task may have unless its resources say (0: none).
    - name: TASK_PIDS_LIMIT
      value: {{ include "task-executor.scalar" $e.taskPidsLimit | quote }}
    {{- end }}
    {{- if $e.showTaskEnv }}
    # Answers show tasks' environment values, as upstream's do (off: names only).
    - name: SHOW_TASK_ENV
      value: "true"
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
    {{- if ne $auth.mode "none" }}
    - name: AUTH_MODE
      value: {{ $auth.mode | quote }}
    {{- end }}
    {{- if eq $auth.mode "token" }}
    - name: AUTH_TOKEN_FILE
      value: /etc/task-executor/auth/tokens
    {{- end }}
    {{- if $tls }}
    - name: TLS_CERT_FILE
      value: /etc/task-executor/tls/tls.crt
    - name: TLS_KEY_FILE
      value: /etc/task-executor/tls/tls.key
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
    httpGet: {path: /health, port: task-api{{ if $tls }}, scheme: HTTPS{{ end }}}
    periodSeconds: 10
    timeoutSeconds: 3
    failureThreshold: 3
  readinessProbe:
    httpGet: {path: /readyz, port: task-api{{ if $tls }}, scheme: HTTPS{{ end }}}
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
    {{- if eq $auth.mode "token" }}
    - name: task-executor-auth
      mountPath: /etc/task-executor/auth
      readOnly: true
    {{- end }}
    {{- if $tls }}
    - name: task-executor-tls
      mountPath: /etc/task-executor/tls
      readOnly: true
    {{- end }}
    {{- if include "task-executor.needsApi" . }}
    # The service account token, in this container only (the pod mounts none).
    - name: task-executor-api-token
      mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      readOnly: true
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
{{- $auth := include "task-executor.authConfig" . | fromYaml }}
{{- if eq $auth.mode "token" }}
- name: task-executor-auth
  secret:
    secretName: {{ $auth.existingSecret | default $auth.generatedSecret | required "task-executor: auth.mode token needs auth.existingSecret" | quote }}
    defaultMode: 256  # 0400: root's (the agent's), not the tasks'
    items:
      - key: {{ $auth.secretKey | quote }}
        path: tokens
{{- end }}
{{- with (.tls | default dict).secretName }}
- name: task-executor-tls
  secret:
    secretName: {{ . | quote }}
    defaultMode: 256  # 0400
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- end }}
{{- if include "task-executor.needsApi" . }}
# What kubelet would mount into every container, for the agent's container alone.
- name: task-executor-api-token
  projected:
    defaultMode: 256  # 0400: the agent's token, unreadable to tasks (another uid)
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - {key: ca.crt, path: ca.crt}
      - downwardAPI:
          items:
            - path: namespace
              fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}
{{- end }}
{{- end }}

{{/* Env items for the main container: how the agent's fallback lookup finds it. */}}
{{- define "task-executor.mainEnv" -}}
- name: SANDBOX_MAIN_CONTAINER
  value: {{ .mainContainerName | default "main" | quote }}
{{- end }}

