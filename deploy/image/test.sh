#!/bin/bash
# `make image-test`: build the four images and run each role as a deployment would, on
# loopback (host network), read-only root file system, as uid 10001:
#   - `referrals --help` in every image, `temporal --version` in the toolbox, the worker's
#     bytecode compiled;
#   - a Temporal dev server (from the toolbox), `db upgrade` and `temporal setup` (toolbox);
#   - the web app (`/livez`, `/readyz`), the worker (its probes), the codec server (`/livez`);
#   - a referral submitted to the web app and walked to commission_paid with the toolbox's CLI,
#     the worker sending its emails to a mail sink on loopback;
#   - SIGTERM stops each at once (exec-form entrypoint), the worker after draining;
#   - deploy/compose.yaml with podman-compose (two workers, two web processes, the codec
#     server, the one-shot jobs), the images it cannot pull stood in for (compose.loopback.yaml):
#     a referral submitted through web-1, its emailed status link opened through web-2.
# No registry is reachable here: the base image is a stand-in built from Debian's packages
# (deploy/image/base.sh) under the real base image's name, unless one is already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.venv/bin
TAG=${TAG:-image-test}
BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
WORK=deploy/image/.work
I=localhost/referral-desk
LIMITS=(--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=4096:4096)
RUN=(podman run "${LIMITS[@]}" --network host --read-only)
PORTS=$($BIN/python -c 'import socket
for _ in range(9):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
read -r -d '' TEMPORAL WEB HEALTH CODEC SMTP UI WEB_1 WEB_2 CODEC_2 <<<"$PORTS" || true
DATABASE=compose_test_$$
COMPOSE=($BIN/podman-compose -p referral-desk-test --podman-args="--runtime runc"
         --podman-run-args="--ulimit nofile=20000:20000 --ulimit nproc=4096:4096"
         --env-file "$WORK/compose.env" -f deploy/compose.yaml -f deploy/image/compose.loopback.yaml)

cleanup() {
  [ -f "$WORK/compose.env" ] && "${COMPOSE[@]}" down -t 10 >/dev/null 2>&1 || true
  podman rm -f -t 5 rd-test-temporal rd-test-web rd-test-worker rd-test-codec >/dev/null 2>&1 || true
  [ -n "${SINK:-}" ] && kill "$SINK" 2>/dev/null || true
  psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $DATABASE WITH (FORCE)" \
    >/dev/null 2>&1 || true
}
trap cleanup EXIT
say() { echo "image-test: $*"; }
wait_for() {
  for _ in $(seq 1 120); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "image-test: no answer from $1" >&2; return 1
}

if ! podman image exists "$BASE_IMAGE"; then
  say "building a stand-in for $BASE_IMAGE from Debian's packages"
  BASE_IMAGE=$BASE_IMAGE deploy/image/base.sh
fi
start=$(date +%s)
make --no-print-directory image TAG="$TAG" IMAGE_BUILD_OPTIONS=--pull=never
say "images built in $(( $(date +%s) - start )) s"
podman image ls --filter "reference=referral-desk-*:$TAG" --format '{{.Repository}} {{.Size}}'

for role in worker web codec-server toolbox; do
  "${RUN[@]}" --rm "referral-desk-$role:$TAG" --help >/dev/null
  say "$role: referrals --help"
done
"${RUN[@]}" --rm --entrypoint temporal "referral-desk-toolbox:$TAG" --version
# The runtime cannot write bytecode (read-only root, PYTHONDONTWRITEBYTECODE): pip compiled the
# wheel's as it installed it, or the sandbox would compile the workflow for every referral.
"${RUN[@]}" --rm --entrypoint python "referral-desk-worker:$TAG" -c 'import os, sys
from importlib.util import cache_from_source
import workflows.referral as module
sys.exit(not os.path.exists(cache_from_source(module.__file__)))'
say "worker: the workflow module's bytecode is in the image"

rm -rf "$WORK" && mkdir -p "$WORK/data" "$WORK/mail"
chown 10001:10001 "$WORK/data"  # the SQLite volume, written by uid 10001
$BIN/python -m starter.mail_sink --port "$SMTP" --maildir "$WORK/mail" >"$WORK/sink.log" &
SINK=$!
KEY=$("${RUN[@]}" --rm --entrypoint python "referral-desk-web:$TAG" \
  -c 'from core.encryption import new_key_entry; print(new_key_entry())')
# The web desk and the toolbox each sign staff actions with a key of their own; every process
# may read the public entries the workers trust (docs/operations.md, "Who acted, proven").
WEB_ACTOR=$($BIN/python -c 'from core.actor_assertions import SigningKey; print(SigningKey.new("web-1", "web").text())')
TOOLBOX_ACTOR=$($BIN/python -c 'from core.actor_assertions import SigningKey; print(SigningKey.new("toolbox-1", "toolbox").text())')
TRUSTED=$($BIN/python -c 'import sys; from core.actor_assertions import SigningKey
print(",".join(SigningKey.parse(text).trusted_entry() for text in sys.argv[1:]))' "$WEB_ACTOR" "$TOOLBOX_ACTOR")
ENVS=(-e "TEMPORAL_ADDRESS=127.0.0.1:$TEMPORAL" -e "REFERRALS_DATABASE_URL=sqlite:////data/referrals.db"
      -e "REFERRALS_ENCRYPTION_KEYS=$KEY" -e REFERRALS_SECRET_KEY=image-test-secret-0123456789abcdefghijklmnop
      -e REFERRALS_SMTP_HOST=127.0.0.1 -e "REFERRALS_SMTP_PORT=$SMTP"
      -e "REFERRALS_PUBLIC_URL=http://127.0.0.1:$WEB" -e "REFERRALS_ACTOR_KEYS=$TRUSTED"
      -v "$PWD/$WORK/data:/data")
# A toolbox acts as the member of staff it is given, and signs for them: it may move money.
toolbox() {
  "${RUN[@]}" --rm "${ENVS[@]}" -e "REFERRALS_ACTOR_SIGNING_KEY=$TOOLBOX_ACTOR" \
    -e REFERRALS_STAFF_IDENTITY=referral-desk-manager@nuage-logiciel.example \
    "referral-desk-toolbox:$TAG" "$@"
}

"${RUN[@]}" -d --name rd-test-temporal --entrypoint temporal "referral-desk-toolbox:$TAG" \
  server start-dev --ip 127.0.0.1 --port "$TEMPORAL" --ui-port "$UI" --headless >/dev/null
until "${RUN[@]}" --rm --entrypoint temporal "referral-desk-toolbox:$TAG" operator cluster health \
  --address "127.0.0.1:$TEMPORAL" >/dev/null 2>&1; do sleep 1; done
toolbox db upgrade
toolbox temporal setup

"${RUN[@]}" -d --name rd-test-web "${ENVS[@]}" -e "REFERRALS_ACTOR_SIGNING_KEY=$WEB_ACTOR" \
  "referral-desk-web:$TAG" \
  web --host 127.0.0.1 --port "$WEB" >/dev/null
"${RUN[@]}" -d --name rd-test-worker "${ENVS[@]}" -e "REFERRALS_HEALTH_PORT=$HEALTH" \
  "referral-desk-worker:$TAG" >/dev/null
"${RUN[@]}" -d --name rd-test-codec -e "REFERRALS_ENCRYPTION_KEYS=$KEY" \
  -e REFERRALS_CODEC_TOKEN=image-token \
  "referral-desk-codec-server:$TAG" codec-server --host 127.0.0.1 --port "$CODEC" >/dev/null
wait_for "http://127.0.0.1:$WEB/livez" && say "web: /livez"
wait_for "http://127.0.0.1:$WEB/readyz" && say "web: /readyz"
wait_for "http://127.0.0.1:$HEALTH/readyz" && say "worker: /readyz"
wait_for "http://127.0.0.1:$CODEC/livez" && say "codec-server: /livez"

submit() {  # a referral through the web app at $1; prints its id
  local body created
  body=$($BIN/python -c "import json, random
data = json.load(open('examples/referral.json'))
data['prospect']['website'] = f'https://www.image-{random.randrange(10**9)}.example/'
print(json.dumps(data))")
  created=$(curl -fsS -H 'content-type: application/json' -d "$body" "$1/api/referrals")
  $BIN/python -c 'import json, sys; print(json.loads(sys.argv[1])["referral_id"])' "$created"
}
status_link() {  # the status link of referral $1 in its acknowledgement email, once sent
  for _ in $(seq 1 120); do
    link=$($BIN/python - "$1" "$WORK/mail" <<'PY'
import mailbox, re, sys
for message in mailbox.Maildir(sys.argv[2], create=False):
    # The plain text part, wherever it is (an acknowledgement also attaches its receipt).
    plain = [p for p in message.walk() if p.get_content_type() == "text/plain"]
    text = plain[0].get_payload(decode=True).decode() if plain else ""
    found = re.search(r"https?://\S+/status/\S+", text)
    if message["X-Referral-Id"] == sys.argv[1] and found:
        print(found.group(0)); break
PY
)
    [ -n "$link" ] && { echo "$link"; return 0; }
    sleep 0.5
  done
  say "no status link emailed for $1"; return 1
}

id=$(submit "http://127.0.0.1:$WEB")
say "submitted $id through the web app"
toolbox contacted "$id"
toolbox accept "$id"
toolbox approve "$id"
toolbox won "$id" --amount 180000 --currency EUR
toolbox payment "$id" --amount 180000 --reference INV-IMAGE-1
toolbox payout "$id" --reference VIR-IMAGE-1
stage=$(toolbox show "$id" --json | $BIN/python -c 'import json, sys; print(json.load(sys.stdin)["stage"])')
[ "$stage" = commission_paid ] || { say "$id ended at $stage"; exit 1; }
emails=$(grep -l "X-Referral-Id: $id" "$WORK"/mail/new/* | wc -l)
[ "$emails" -ge 5 ] || { say "only $emails emails for $id"; exit 1; }
say "$id walked to commission_paid by the worker image, $emails emails sent"

for name in rd-test-web rd-test-worker rd-test-codec; do
  podman stop -t 90 "$name" >/dev/null
  code=$(podman inspect "$name" --format '{{.State.ExitCode}}')
  say "$name stopped by SIGTERM, exit $code"
  [ "$code" = 0 ] || [ "$code" = 143 ] || { podman logs "$name" | tail -20; exit 1; }
done
say "compose: deploy/compose.yaml, PostgreSQL, Temporal and SMTP stood in for"
psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $DATABASE"
cat >"$WORK/compose.env" <<ENV
POSTGRES_PASSWORD=unused-here
TAG=$TAG
WEB_1_PORT=$WEB_1
WEB_2_PORT=$WEB_2
CODEC_PORT=$CODEC_2
REFERRALS_ENV_FILE=$PWD/$WORK/compose.env
TEMPORAL_ADDRESS=127.0.0.1:$TEMPORAL
REFERRALS_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/$DATABASE
REFERRALS_ENCRYPTION_KEYS=$KEY
REFERRALS_SECRET_KEY=compose-secret-0123456789abcdefghijklmnopqrstu
REFERRALS_CODEC_TOKEN=compose-token
REFERRALS_ACTOR_SIGNING_KEY=$WEB_ACTOR
REFERRALS_ACTOR_KEYS=$TRUSTED
REFERRALS_SMTP_HOST=127.0.0.1
REFERRALS_SMTP_PORT=$SMTP
REFERRALS_PUBLIC_URL=https://referrals.example.com
ENV
"${COMPOSE[@]}" up -d >"$WORK/compose-up.log" 2>&1 || { cat "$WORK/compose-up.log"; exit 1; }
wait_for "http://127.0.0.1:$WEB_1/readyz" && say "compose: web-1 ready"
wait_for "http://127.0.0.1:$WEB_2/readyz" && say "compose: web-2 ready"
wait_for "http://127.0.0.1:$CODEC_2/livez" && say "compose: codec-server alive"
id=$(submit "http://127.0.0.1:$WEB_1")
link=$(status_link "$id")
path=${link#https://referrals.example.com}
curl -fsS -o /dev/null "http://127.0.0.1:$WEB_2$path"
say "compose: $id submitted through web-1, its emailed status link opened through web-2"
"${COMPOSE[@]}" ps --format '{{.Names}} {{.Status}}' 2>/dev/null || true
"${COMPOSE[@]}" down -t 90 >/dev/null 2>&1
say "all images pass"
