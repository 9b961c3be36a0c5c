#!/usr/bin/env bash
# Walks through every endpoint of the agent's HTTP API against a pod of the chart:
#   examples/curl-session.sh [RELEASE] [NAMESPACE]
# Uses kubectl port-forward, so only kubectl access to the namespace is needed.
# With auth (chart value auth.mode), pass the bearer token: TOKEN=... examples/curl-session.sh;
# with TLS (tls.secretName), SCHEME=https (the certificate is not verified: -k).
set -euo pipefail

RELEASE="${1:-sandbox}"
NAMESPACE="${2:-default}"
PORT="${PORT:-5758}"
API="${SCHEME:-http}://127.0.0.1:$PORT"
AUTH=()
[ -n "${TOKEN:-}" ] && AUTH=(-H "Authorization: Bearer $TOKEN")

kubectl -n "$NAMESPACE" port-forward "deploy/$RELEASE-task-executor" "$PORT:5758" >/dev/null &
PF=$!
trap 'kill "$PF"' EXIT
# Wait for the forward to accept connections.
for _ in $(seq 50); do curl -fsk "$API/health" >/dev/null && break; sleep 0.2; done

say() { printf '\n### %s\n' "$*"; }
json() { curl -sSk -w '\n[HTTP %{http_code}]\n' -H 'Content-Type: application/json' ${AUTH[@]+"${AUTH[@]}"} "$@"; }

say "GET /health (liveness: always 200)"
json "$API/health"

say "GET /readyz (readiness: 200, or 503 with reasons)"
json "$API/readyz"

say "POST /tasks: create one task"
json -X POST "$API/tasks" -d '{
  "name": "hello",
  "spec": {"process": {"command": ["sh", "-c"], "args": ["echo hello; sleep 3; echo done"]}}
}'

say "GET /tasks/hello: its state (waiting, running or terminated)"
json "$API/tasks/hello"

say "GET /getTasks: every task"
json "$API/getTasks"

say "POST /setTasks: the desired set; hello is absent, so it is stopped and removed"
json -X POST "$API/setTasks" -d '[
  {"name": "alpha", "spec": {"process": {"command": ["sleep", "10"]}}},
  {"name": "beta", "spec": {"process": {"command": ["ls", "-l", "/tmp"]}}}
]'

sleep 1
say "GET /tasks/beta: finished by now"
json "$API/tasks/beta"

say "DELETE /tasks/alpha: stop it (204), removal follows"
json -X DELETE "$API/tasks/alpha"

say "POST /setTasks []: remove everything"
json -X POST "$API/setTasks" -d '[]'
