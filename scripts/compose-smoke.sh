#!/usr/bin/env bash
# CI smoke test of the team deployment, for real:
#   1. docker-compose.yml validates (Debian's docker-compose 1.29), every profile;
#   2. the service, sandbox and Redis images build on the local Debian base (no Docker Hub);
#   3. redis + docker-proxy + worker run in containers, `codeloop doctor` passes inside the worker;
#   4. `codeloop console` in a container asks one question; the scripted model answers with code,
#      the worker runs it in a sandbox through the docker proxy, and the output comes back;
#   5. the Slack bot (HTTP mode) joins, against a fake Slack Web API in a container; every service's
#      healthcheck reports healthy; one signed mention is answered in its thread (the sandbox's
#      output in Slack); `docker-compose ps` shows no unhealthy service.
# The scripted model serves one model name, like vLLM: the worker must send CODELOOP_MODEL.
# Every connection stays on 127.0.0.1 (deploy/compose.smoke.yml puts services on the host network).
# Usage: scripts/compose-smoke.sh        Env: PYTHON (interpreter with codeloop's test deps),
#        KEEP=1 leaves the stack up for a look, BASE_IMAGE (default codeloop/base:bookworm).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { echo "==> [$(( $(date +%s) - start ))s] $*"; }
die() { echo "compose-smoke: FAILED: $*" >&2; exit 1; }

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
BASE_IMAGE=${BASE_IMAGE:-codeloop/base:bookworm}
command -v docker-compose >/dev/null || die "docker-compose missing: apt-get install -y docker-compose"
docker info >/dev/null 2>&1 || die "no Docker engine: start dockerd"

project="codeloopsmoke$$"
thread="smoke-$$-$RANDOM"
tmp=$(mktemp -d /tmp/codeloop-smoke.XXXXXX)
free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port=$(free_port); model_port=$(free_port); metrics_port=$(free_port)
slack_api_port=$(free_port); slack_events_port=$(free_port); slack_metrics_port=$(free_port)
slack_secret="smoke-signing-secret-$RANDOM"
created_certs=()
model_pid=""

# the legacy builder's deprecation banner says nothing about this test
quiet() { "$@" 2>&1 | { grep -vE 'DEPRECATED: The legacy builder|Install the buildx|docs.docker.com/go/buildx|^$' || true; }; }
compose() { docker-compose -p "$project" --env-file "$tmp/smoke.env" -f docker-compose.yml -f deploy/compose.smoke.yml "$@"; }
services=(redis docker-proxy worker slack fake-slack)
# health of a service's container: healthy | starting | unhealthy | none
wait_healthy() {  # SERVICE...: until each one's healthcheck says healthy; unhealthy fails at once
  local deadline=$(( $(date +%s) + 180 )) states all state svc
  while :; do
    states=""; all=1
    for svc in "$@"; do
      state=$(health "$svc"); states="$states $svc=$state"
      [ "$state" = unhealthy ] && die "$svc is unhealthy:$states"
      [ "$state" = healthy ] || all=0
    done
    [ "$all" = 1 ] && { echo "   $states"; return 0; }
    [ "$(date +%s)" -lt "$deadline" ] || die "not healthy within 180s:$states"
    sleep 2
  done
}
health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' \
  "$(compose --profile slack ps -q "$1")" 2>/dev/null || echo missing; }

cleanup() {
  status=$?
  if [ "$status" -ne 0 ] && [ -f "$tmp/smoke.env" ]; then
    echo "---- service logs (last 60 lines each) ----"
    compose --profile slack logs --no-color --tail 60 worker docker-proxy fake-slack 2>&1 || true
    echo "---- slack ----"; docker logs --tail 60 "${project}_slack_1" 2>&1 || true
    [ -f "$tmp/model.log" ] && { echo "---- model server log ----"; tail -20 "$tmp/model.log"; }
  fi
  if [ -z "${KEEP:-}" ]; then
    docker rm -f "${project}_slack_1" >/dev/null 2>&1 || true
    [ -f "$tmp/smoke.env" ] && compose --profile slack down -v --remove-orphans >/dev/null 2>&1 || true
    # the sandboxes of this run (console and Slack threads): every one runs the smoke's own image
    for id in $(docker ps -aq --filter label=codeloop.session=1 --filter ancestor=codeloop-sandbox:smoke); do
      docker rm -f "$id" >/dev/null 2>&1 || true
    done
    [ -n "$model_pid" ] && kill "$model_pid" 2>/dev/null || true
    rm -rf "$tmp"
  fi
  for f in "${created_certs[@]}"; do rm -f "$f"; done
  exit "$status"
}
trap cleanup EXIT

cat > "$tmp/smoke.env" <<EOF
CODELOOP_REDIS_URL=redis://127.0.0.1:$redis_port/0
CODELOOP_LLM_URL=http://127.0.0.1:$model_port
CODELOOP_KEY_PREFIX=$project
CODELOOP_SANDBOX_IMAGE=codeloop-sandbox:smoke
CODELOOP_SANDBOX_POOL_SIZE=0
CODELOOP_METRICS_PORT=$metrics_port
CODELOOP_LOG_JSON=true
CODELOOP_MODEL=smoke/served-by-name
CODELOOP_SLACK_MODE=http
CODELOOP_SLACK_HTTP_HOST=127.0.0.1
CODELOOP_SLACK_HTTP_PORT=$slack_events_port
CODELOOP_SLACK_BOT_TOKEN=xoxb-smoke-$RANDOM
CODELOOP_SLACK_SIGNING_SECRET=$slack_secret
CODELOOP_SLACK_API_URL=http://127.0.0.1:$slack_api_port/api/
SMOKE_SLACK_API_PORT=$slack_api_port
SMOKE_SLACK_METRICS_PORT=$slack_metrics_port
DEPLOY_IMAGE=codeloop:smoke
DEPLOY_BASE_IMAGE=$BASE_IMAGE
DEPLOY_SANDBOX_BASE_IMAGE=$BASE_IMAGE
DEPLOY_REDIS_IMAGE=codeloop/redis:bookworm
DEPLOY_REDIS_PORT=$redis_port
DEPLOY_ENV_FILE=$tmp/smoke.env
EOF
export DEPLOY_ENV_FILE="$tmp/smoke.env"

step "validate docker-compose.yml with .env.example (all profiles)"
DEPLOY_ENV_FILE=.env.example docker-compose --env-file .env.example --profile tgi --profile gpu \
  --profile cpu --profile slack --profile discord --profile console --profile build config -q
compose --profile console --profile build --profile slack config -q

step "base image $BASE_IMAGE"
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  [ "$BASE_IMAGE" = codeloop/base:bookworm ] || die "$BASE_IMAGE is not on the engine"
  deploy/build-base-image.sh "$BASE_IMAGE"
fi

# This CI reaches PyPI through a TLS-intercepting proxy: hand its CA to the image builds (build
# stage only). Production builds have no such file and need none.
host_ca=/etc/ssl/certs/ca-certificates.crt
if [ -f "$host_ca" ]; then
  for dest in deploy/certs/host-ca.crt runner/certs/host-ca.crt; do
    if [ ! -e "$dest" ]; then cp "$host_ca" "$dest"; created_certs+=("$dest"); fi
  done
fi

t=$(date +%s)
step "build the service image (codeloop:smoke on $BASE_IMAGE)"
quiet compose build -q worker
service_s=$(( $(date +%s) - t )); t=$(date +%s)
step "build the sandbox image (codeloop-sandbox:smoke, runner/Dockerfile)"
quiet compose --profile build build -q sandbox
sandbox_s=$(( $(date +%s) - t )); t=$(date +%s)
step "build Redis from Debian's mirror (codeloop/redis:bookworm)"
quiet docker build -q --build-arg BASE="$BASE_IMAGE" -t codeloop/redis:bookworm \
  -f deploy/images/redis.Dockerfile deploy/images >/dev/null
redis_s=$(( $(date +%s) - t ))
for f in "${created_certs[@]}"; do rm -f "$f"; done; created_certs=()
docker run --rm --entrypoint id codeloop:smoke -u | grep -qx 10001 || die "the service image does not run as uid 10001"

step "scripted model server on 127.0.0.1:$model_port"
# Reply 1 writes code; the worker runs it and feeds the result back; reply 2 ends the job. Twice:
# once for the console's question, once for the Slack mention.
cat > "$tmp/script.json" <<'EOF'
["Let me compute it.\n\n```python\nimport platform\nprint('sum =', sum(i * i for i in range(10)), 'on', platform.python_implementation())\n```", "The sum of the squares of 0..9 is 285.", "Let me compute it.\n\n```python\nimport platform\nprint('sum =', sum(i * i for i in range(10)), 'on', platform.python_implementation())\n```", "The sum of the squares of 0..9 is 285."]
EOF
"$PYTHON" -m tests.fakes.model_server --port "$model_port" --script "$tmp/script.json" \
  --served-model smoke/served-by-name >"$tmp/model.log" 2>&1 &
model_pid=$!

step "up: the fake Slack Web API, then redis, docker-proxy, worker"
compose --profile slack up -d fake-slack
wait_healthy fake-slack
compose up -d worker
compose exec -T worker codeloop doctor --timeout 10 || die "codeloop doctor failed inside the worker"

step "console in a container asks one question"
t=$(date +%s)
answer=$(echo "What is the sum of the squares of 0..9? Use Python." \
  | timeout 180 docker-compose -p "$project" --env-file "$tmp/smoke.env" -f docker-compose.yml \
      -f deploy/compose.smoke.yml run --rm -T console console --worker never --batch --thread "$thread" 2>&1) \
  || { echo "$answer"; die "the console did not finish"; }
echo "$answer" | sed 's/^/    console| /'
answer_s=$(( $(date +%s) - t ))
echo "$answer" | grep -q "sum = 285 on CPython" || die "no sandbox output in the answer"
echo "$answer" | grep -q "^\[final\] done" || die "no final event"

step "worker metrics on 127.0.0.1:$metrics_port"
metrics=$("$PYTHON" -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$metrics_port/metrics').read().decode())")
echo "$metrics" | grep -E '^codeloop_jobs_total\{outcome="ok"\} 1\.0' | sed 's/^/    /' \
  || die "the worker's metrics do not count the job"

step "up: the Slack bot in HTTP mode on 127.0.0.1:$slack_events_port; every healthcheck must say healthy"
# `run`, not `up`: the service publishes its HTTP-mode port on the host's 127.0.0.1, which host
# networking cannot take (docker-compose refuses port bindings there); `run` publishes none and
# is otherwise the same service: image, command, settings, healthcheck.
compose --profile slack run -d --name "${project}_slack_1" slack >/dev/null
wait_healthy "${services[@]}"

step "a signed mention in Slack is answered in its thread"
t=$(date +%s)
event_ts="$(date +%s).000100"
SECRET="$slack_secret" PORT="$slack_events_port" TS="$event_ts" "$PYTHON" - <<'EOF' || die "the Slack bot refused the event"
import hashlib, hmac, json, os, time, urllib.request
event = {"type": "app_mention", "user": "U0SMOKE", "channel": "C0SMOKE", "ts": os.environ["TS"],
         "text": "<@UBOT> What is the sum of the squares of 0..9? Use Python.", "team": "T0001"}
body = json.dumps({"type": "event_callback", "team_id": "T0001", "api_app_id": "A0SMOKE", "event": event,
                   "event_id": "Ev0SMOKE" + os.environ["TS"].replace(".", ""), "event_time": int(time.time())})
stamp = str(int(time.time()))
signature = "v0=" + hmac.new(os.environ["SECRET"].encode(), f"v0:{stamp}:{body}".encode(), hashlib.sha256).hexdigest()
request = urllib.request.Request(f"http://127.0.0.1:{os.environ['PORT']}/slack/events", data=body.encode(),
                                 headers={"Content-Type": "application/json", "X-Slack-Request-Timestamp": stamp,
                                          "X-Slack-Signature": signature})
with urllib.request.urlopen(request, timeout=10) as resp:
    assert resp.status == 200, resp.status
EOF
thread="[]"
for _ in $(seq 1 90); do
  thread=$("$PYTHON" -c "
import json, urllib.request
msgs = json.load(urllib.request.urlopen('http://127.0.0.1:$slack_api_port/_fake/messages', timeout=5))
print(json.dumps([m for m in msgs if m.get('thread_ts') == '$event_ts']))")
  echo "$thread" | grep -q 'sum = 285 on CPython' && echo "$thread" | grep -q 'is 285' && break
  sleep 2
done
echo "$thread" | "$PYTHON" -c "import json, sys; [print('    slack|', m['text'][:160].replace(chr(10), ' ')) for m in json.load(sys.stdin)]"
echo "$thread" | grep -q 'sum = 285 on CPython' || die "the sandbox's output never reached the Slack thread"
echo "$thread" | grep -q 'is 285' || die "the model's final answer never reached the Slack thread"
slack_s=$(( $(date +%s) - t ))
"$PYTHON" -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$metrics_port/metrics').read().decode())" \
  | grep -E '^codeloop_jobs_total\{outcome="ok"\} 2\.0' >/dev/null || die "the worker's metrics do not count the Slack job"

step "docker-compose ps: no service unhealthy"
compose --profile slack ps | tee "$tmp/ps.txt" | sed 's/^/    /'
grep -q unhealthy "$tmp/ps.txt" && die "a service is unhealthy"
for svc in "${services[@]}"; do [ "$(health "$svc")" = healthy ] || die "$svc is $(health "$svc")"; done

step "passed: images built in ${service_s}s (service), ${sandbox_s}s (sandbox), ${redis_s}s (redis); console answer in ${answer_s}s, Slack answer in ${slack_s}s"
