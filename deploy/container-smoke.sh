#!/usr/bin/env bash
# Container smoke test: build the CPU edge image, run it, and drive it end to end through its REST API.
#
#   deploy/container-smoke.sh                                   # from the repository root (or anywhere)
#   EAGLE_WHEELS=/tmp/eagle-wheels deploy/container-smoke.sh    # pip installs only from that wheel directory
#
# Steps: build `--target edge` with REQUIREMENTS=requirements.txt; run it with a token, random expert weights and
# no MLLM; wait for /healthz and for /readyz to fail on nothing but the missing bank; build a bank through
# POST /v1/banks from synthetic normal images (tests/synthetic.py); wait for /readyz; inspect a good and a
# defective image and check the verdicts; check the audit rows (`eagle audit` in the container), that PID 1
# runs as the non-root user, the HEALTHCHECK; `docker stop` (SIGTERM): exit 0/143 well within the grace period,
# graceful shutdown in the log; `docker start` again: cold start to ready with the bank on the volume.
# Numbers go to bench/results/container-<date>.json. Slow (minutes): not part of .ci/run.
#
# Environment:
#   DOCKER        docker client (default: `docker`). It needs BuildKit: buildx, or a client <= 20.10 with
#                 DOCKER_BUILDKIT=1. When `docker` has neither, /usr/bin/docker is tried (Debian's docker.io).
#   BASE_IMAGE    bookworm base (default debian:bookworm-slim). When it is not there and cannot be pulled (no
#                 registry), a local one is made with debootstrap: eagle-base:bookworm.
#   EAGLE_WHEELS  a COMPLETE wheel directory (`pip download -r requirements.txt -d DIR`); default: the index.
#   PIP_CERT      CA bundle of a TLS-intercepting proxy, passed as a build secret (default: pip's `cert` setting).
#   PYTHON        a Python with numpy, opencv and pillow, for the synthetic images (default: .venv/bin/python).
#   IMAGE         image tag (default eagle-edge:smoke);  NO_CACHE=1: build without the layer cache.
#   RESULTS       the JSON to write (default bench/results/container-<UTC date>.json);  KEEP=1: keep the
#                 container and its volumes for a look afterwards.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
IMAGE=${IMAGE:-eagle-edge:smoke}
BASE_IMAGE=${BASE_IMAGE:-debian:bookworm-slim}
RESULTS=${RESULTS:-bench/results/container-$(date -u +%F).json}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
NAME=eagle-smoke-$$
BANK=widget
GRACE_S=60
WORK=$(mktemp -d "${TMPDIR:-/tmp}/eagle-smoke.XXXXXX")
TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')

log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$1" "$(now)"; }
json() { python3 -c "import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1], {'d': d}))" "$1"; }

# -- the docker client ------------------------------------------------------------------------------------------
buildkit_client() {  # prints "buildx" or "classic" when $1 can build this Dockerfile (RUN --mount, --secret)
    if "$1" buildx version > /dev/null 2>&1; then echo buildx; return 0; fi
    local major
    major=$("$1" version --format '{{.Client.Version}}' 2> /dev/null | cut -d. -f1) || return 1
    [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -le 20 ] && echo classic
}
DOCKER=${DOCKER:-docker}
if ! BUILDER=$(buildkit_client "$DOCKER"); then
    if [ "$DOCKER" = docker ] && [ -x /usr/bin/docker ] && BUILDER=$(buildkit_client /usr/bin/docker); then
        DOCKER=/usr/bin/docker
    else
        fail "$DOCKER can not build with BuildKit: install buildx, or set DOCKER to a client that can"
    fi
fi
"$DOCKER" info > /dev/null 2>&1 || fail "no Docker daemon answers ($DOCKER info)"
log "client $DOCKER ($BUILDER), server $("$DOCKER" version --format '{{.Server.Version}}')"

cleanup() {
    local rc=$?
    if [ "$rc" -ne 0 ] && "$DOCKER" container inspect "$NAME" > /dev/null 2>&1; then
        log "container log (last 60 lines):"; "$DOCKER" logs --tail 60 "$NAME" >&2 || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        log "kept: container $NAME, volumes $NAME-data $NAME-models, files $WORK"
    else
        "$DOCKER" rm -f "$NAME" > /dev/null 2>&1 || true
        "$DOCKER" volume rm "$NAME-data" "$NAME-models" > /dev/null 2>&1 || true
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT

# -- base image and wheels -------------------------------------------------------------------------------------
if ! "$DOCKER" image inspect "$BASE_IMAGE" > /dev/null 2>&1 && ! timeout 120 "$DOCKER" pull -q "$BASE_IMAGE" > /dev/null 2>&1; then
    log "$BASE_IMAGE: not here and not pullable"
    BASE_IMAGE=eagle-base:bookworm
    if ! "$DOCKER" image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
        command -v debootstrap > /dev/null || fail "no base image, no registry and no debootstrap (apt-get install debootstrap)"
        [ "$(id -u)" = 0 ] || fail "debootstrap needs root"
        log "making $BASE_IMAGE with debootstrap (minbase bookworm)"
        debootstrap --variant=minbase bookworm "$WORK/rootfs" > "$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
        tar -C "$WORK/rootfs" -c . | "$DOCKER" import - "$BASE_IMAGE" > /dev/null
        rm -rf "$WORK/rootfs"
    fi
fi
BUILD_ARGS=(--target edge -t "$IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg REQUIREMENTS=requirements.txt)
WHEELS_SOURCE="package index"
if [ -n "${EAGLE_WHEELS:-}" ]; then
    ls "$EAGLE_WHEELS"/*.whl > /dev/null 2>&1 || fail "EAGLE_WHEELS=$EAGLE_WHEELS holds no wheels"
    WHEELS_SOURCE="local wheel directory ($(ls "$EAGLE_WHEELS"/*.whl | wc -l) wheels)"
    if [ "$BUILDER" = buildx ]; then
        BUILD_ARGS+=(--build-context "wheels=$EAGLE_WHEELS")
    else  # no named contexts before buildx: the directory as an image (cached by its listing)
        tag=eagle-wheels:$(cd "$EAGLE_WHEELS" && ls -lL -- *.whl | sha256sum | cut -c1-12)
        if ! "$DOCKER" image inspect "$tag" > /dev/null 2>&1; then
            log "importing $EAGLE_WHEELS as $tag"
            tar -C "$EAGLE_WHEELS" -ch . | "$DOCKER" import - "$tag" > /dev/null
        fi
        BUILD_ARGS+=(--build-arg "WHEELS_IMAGE=$tag")
    fi
fi
CERT=${PIP_CERT:-$(python3 -m pip config get global.cert 2> /dev/null || true)}
if [ -n "$CERT" ] && [ -f "$CERT" ]; then BUILD_ARGS+=(--secret "id=pip_cert,src=$CERT"); fi
[ "${NO_CACHE:-0}" = 1 ] && BUILD_ARGS+=(--no-cache)

# -- build ---------------------------------------------------------------------------------------------------------
log "building $IMAGE from $BASE_IMAGE, wheels from the $WHEELS_SOURCE (log: $WORK/build.log)"
OLD_ID=$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE" 2> /dev/null || true)
t0=$(now)
if [ "$BUILDER" = buildx ]; then
    "$DOCKER" buildx build --load --progress=plain "${BUILD_ARGS[@]}" . > "$WORK/build.log" 2>&1 || BUILD_RC=$?
else
    DOCKER_BUILDKIT=1 "$DOCKER" build --progress=plain "${BUILD_ARGS[@]}" . > "$WORK/build.log" 2>&1 || BUILD_RC=$?
fi
[ "${BUILD_RC:-0}" = 0 ] || { tail -40 "$WORK/build.log" >&2; fail "docker build"; }
BUILD_S=$(since "$t0")
step=$(grep -m1 -o '^#[0-9]* \[[a-z]* *[0-9]*/[0-9]*\] RUN .*-r requirements.txt' "$WORK/build.log" | cut -d' ' -f1 || true)
PIP_CACHED=false
if [ -n "$step" ] && grep -q "^$step CACHED" "$WORK/build.log"; then PIP_CACHED=true; fi
IMAGE_BYTES=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
if [ -n "$OLD_ID" ] && [ "$OLD_ID" != "$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE")" ]; then
    "$DOCKER" rmi "$OLD_ID" > /dev/null 2>&1 || true  # the previous smoke image, now untagged
fi
log "built in ${BUILD_S}s (requirements layer cached: $PIP_CACHED), image $((IMAGE_BYTES / 1000000)) MB"

# -- synthetic images -------------------------------------------------------------------------------------------
"$PYTHON" - "$WORK" <<'EOF'
import sys, zipfile
from pathlib import Path
sys.path.insert(0, "tests")
from synthetic import make_mvtec_like  # noqa: E402
work = Path(sys.argv[1])
root = make_mvtec_like(work / "mvtec", seed=0) / "widget"
with zipfile.ZipFile(work / "train.zip", "w") as archive:
    for path in sorted((root / "train" / "good").glob("*.png")):
        archive.write(path, path.name)
EOF
GOOD=$WORK/mvtec/widget/test/good/000.png
DEFECT=$WORK/mvtec/widget/test/scratch/000.png

# -- run -------------------------------------------------------------------------------------------------------
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
AUTH=(-H "Authorization: Bearer $TOKEN")
status_of() { curl -s -o /dev/null -w '%{http_code}' "$@" || true; }
wait_for() {  # wait_for PATH CODE TIMEOUT: until GET PATH answers CODE
    local deadline=$(( $(date +%s) + $3 ))
    until [ "$(status_of "$URL$1")" = "$2" ]; do
        [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$NAME")" = true ] || fail "the container exited while waiting for $1"
        [ "$(date +%s)" -lt "$deadline" ] || fail "$1 did not answer $2 within $3 s"
        sleep 0.2
    done
}
log "running $NAME on $URL"
t0=$(now)
"$DOCKER" run -d --name "$NAME" -p "127.0.0.1:$PORT:8080" \
    -e "EAGLE_SERVICE__TOKEN=$TOKEN" -e EAGLE_EXPERT__WEIGHTS=random -e EAGLE_MLLM__ENABLED=false \
    -e HF_HUB_OFFLINE=1 -v "$NAME-data:/data" -v "$NAME-models:/models" "$IMAGE" > /dev/null
wait_for /healthz 200 180
ALIVE_S=$(since "$t0")
ready=$(curl -s "$URL/readyz")
[ "$(json "sorted(k for k, ok in d['checks'].items() if not ok)" <<< "$ready")" = "['banks']" ] \
    || fail "/readyz before any bank: expected only 'banks' missing, got $ready"
log "alive after ${ALIVE_S}s; /readyz waits for a bank only"
[ "$(status_of "$URL/v1/banks")" = 401 ] || fail "/v1/banks without the token did not answer 401"

# -- bank, readiness, inspections ------------------------------------------------------------------------------
t0=$(now)
job=$(curl -sf "${AUTH[@]}" -F "name=$BANK" -F "archive=@$WORK/train.zip" "$URL/v1/banks") || fail "POST /v1/banks"
JOB_ID=$(json "d['id']" <<< "$job")
deadline=$(( $(date +%s) + 900 ))
while :; do
    job=$(curl -sf "${AUTH[@]}" "$URL/v1/jobs/$JOB_ID") || fail "GET /v1/jobs/$JOB_ID"
    state=$(json "d['state']" <<< "$job")
    [ "$state" = succeeded ] && break
    [ "$state" = failed ] && fail "bank build failed: $job"
    [ "$(date +%s)" -lt "$deadline" ] || fail "bank build did not finish in 900 s: $job"
    sleep 2
done
BANK_S=$(since "$t0")
N_REFS=$(json "d['n_images']" <<< "$job")
log "bank '$BANK' built from $N_REFS images in ${BANK_S}s"
wait_for /readyz 200 60
[ "$(curl -s "$URL/readyz" | json "d['ready']")" = True ] || fail "/readyz not ready after the bank"

inspect() {  # inspect FILE EXPECTED_DECISION EXPECTED_VERDICT -> prints the response
    local out t
    t=$(now)
    out=$(curl -sf "${AUTH[@]}" -F "image=@$1" -F "bank=$BANK" "$URL/v1/inspect") || fail "POST /v1/inspect $1"
    local got
    got=$(json "d['result']['expert_decision'] + ' ' + d['result']['verdict']" <<< "$out")
    [ "$got" = "$2 $3" ] || fail "$1: expected '$2 $3', got '$got': $out"
    log "$(basename "$(dirname "$1")")/$(basename "$1"): $got ($(json "'score %.4g, tau %.4g' % (d['result']['score'], d['result']['tau'])" <<< "$out"), $(since "$t") s)"
    echo "$out"
}
good=$(inspect "$GOOD" normal no_defect)
defect=$(inspect "$DEFECT" anomalous defect)
[ "$(json "len(d['result']['boxes']) > 0" <<< "$defect")" = True ] || fail "no box on the defective image"

# -- audit, user, health ---------------------------------------------------------------------------------------
"$DOCKER" exec "$NAME" eagle audit --limit 2 --csv - > "$WORK/audit.csv"
python3 - "$WORK/audit.csv" "$(json "d['request_id']" <<< "$good")" "$(json "d['request_id']" <<< "$defect")" <<'EOF' \
    || fail "audit rows"
import csv, sys
rows = {row["run_id"]: row for row in csv.DictReader(open(sys.argv[1]))}
for run_id, decision, verdict in ((sys.argv[2], "normal", "no_defect"), (sys.argv[3], "anomalous", "defect")):
    row = rows.get(run_id)
    assert row, f"no audit row for {run_id}: {rows}"
    got = (row["source"], row["bank"], row["decision"], row["verdict"], row["status"])
    assert got == ("api", "widget", decision, verdict, "ok"), got
EOF
log "audit rows: ok"
PID1_UID=$("$DOCKER" exec "$NAME" sh -c 'grep ^Uid: /proc/1/status' | awk '{print $2}')
PID1_CMD=$("$DOCKER" exec "$NAME" sh -c 'tr "\0" " " < /proc/1/cmdline')
[ "$PID1_UID" = 10001 ] || fail "PID 1 runs as uid $PID1_UID, not 10001 (eagle)"
[ "$("$DOCKER" exec "$NAME" id -un)" = eagle ] || fail "docker exec user is not eagle"
log "PID 1 ($PID1_CMD) runs as uid $PID1_UID"
deadline=$(( $(date +%s) + 120 ))
until [ "$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$NAME")" = healthy ]; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "HEALTHCHECK: $("$DOCKER" inspect -f '{{json .State.Health}}' "$NAME")"
    sleep 2
done
log "HEALTHCHECK: healthy"

# -- SIGTERM ----------------------------------------------------------------------------------------------------
stop_and_check() {  # stop_and_check N (the Nth stop of this container): prints "SECONDS EXIT_CODE"
    local t rc
    t=$(now)
    "$DOCKER" stop -t "$GRACE_S" "$NAME" > /dev/null
    local took
    took=$(since "$t")
    rc=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$NAME")
    [ "$rc" = 0 ] || [ "$rc" = 143 ] || fail "exit code $rc after SIGTERM"
    python3 -c "import sys; sys.exit(float(sys.argv[1]) >= float(sys.argv[2]) - 1)" "$took" "$GRACE_S" \
        || fail "docker stop took ${took}s: the grace period ran out (SIGKILL)"
    "$DOCKER" logs "$NAME" > "$WORK/container.log" 2>&1
    [ "$(grep -c "Application shutdown complete" "$WORK/container.log")" = "$1" ] || fail "no graceful shutdown in the log"
    ! grep -q Traceback "$WORK/container.log" || fail "a traceback in the log"
    log "stopped by SIGTERM in ${took}s, exit code $rc, graceful shutdown logged"
    echo "$took $rc"
}
stopped=$(stop_and_check 1)
read -r STOP_S STOP_RC <<< "$stopped"

# -- cold start with the bank on the volume ----------------------------------------------------------------------
t0=$(now)
"$DOCKER" start "$NAME" > /dev/null
wait_for /readyz 200 300
READY_S=$(since "$t0")
log "restarted: ready after ${READY_S}s"
t0=$(now)
inspect "$GOOD" normal no_defect > /dev/null
FIRST_INSPECT_S=$(since "$t0")
stopped=$(stop_and_check 2)
read -r STOP2_S STOP2_RC <<< "$stopped"

# -- results ---------------------------------------------------------------------------------------------------
mkdir -p "$(dirname "$RESULTS")"
SMOKE_JSON=$(cat <<EOF
{"build_s": $BUILD_S, "pip_cached": "$PIP_CACHED", "image_bytes": $IMAGE_BYTES, "alive_s": $ALIVE_S,
 "bank_s": $BANK_S, "n_refs": $N_REFS, "ready_s": $READY_S, "first_inspect_s": $FIRST_INSPECT_S,
 "stop_s": $STOP_S, "stop_rc": $STOP_RC, "stop2_s": $STOP2_S, "stop2_rc": $STOP2_RC, "pid1_uid": $PID1_UID}
EOF
)
SMOKE_JSON=$SMOKE_JSON GOOD_JSON=$good DEFECT_JSON=$defect IMAGE=$IMAGE BASE_IMAGE=$BASE_IMAGE \
WHEELS_SOURCE=$WHEELS_SOURCE PID1_CMD=$PID1_CMD \
DOCKER_SERVER=$("$DOCKER" version --format '{{.Server.Version}}') BUILDER=$BUILDER \
python3 - "$RESULTS" <<'EOF'
import datetime, json, os, platform, sys
m = json.loads(os.environ["SMOKE_JSON"])
def inspection(name, file):
    r = json.loads(os.environ[name])["result"]
    keys = ("score", "tau", "s_max", "low_confidence", "expert_decision", "verdict", "timings_ms")
    return {"file": f"tests/synthetic.py make_mvtec_like(seed=0): widget/{file}"} | {k: r[k] for k in keys} | {
        "boxes": len(r["boxes"])}
result = {
    "benchmark": "container smoke test: CPU edge image (deploy/container-smoke.sh)",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "passed": True,
    "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "docker_server": os.environ["DOCKER_SERVER"], "builder": os.environ["BUILDER"],
        "note": "shared development machine: other jobs ran at the same time (see load average)",
    },
    "image": {
        "tag": os.environ["IMAGE"], "target": "edge", "requirements": "requirements.txt",
        "base": os.environ["BASE_IMAGE"], "wheels": os.environ["WHEELS_SOURCE"],
        "size_bytes": m["image_bytes"], "size_gb": round(m["image_bytes"] / 1e9, 2),
        "build_s": m["build_s"], "no_cache": os.environ.get("NO_CACHE") == "1",
        "requirements_layer_cached": m["pip_cached"] == "true",
    },
    "run": {
        "settings": {"EAGLE_EXPERT__WEIGHTS": "random", "EAGLE_MLLM__ENABLED": "false", "token": "set"},
        "cold_start_to_alive_s": m["alive_s"],
        "bank": {"references": m["n_refs"], "build_via_api_s": m["bank_s"]},
        "inspections": {
            "good": inspection("GOOD_JSON", "test/good/000.png"),
            "defect": inspection("DEFECT_JSON", "test/scratch/000.png"),
        },
        "pid1": {"uid": m["pid1_uid"], "cmd": os.environ["PID1_CMD"].strip()},
        "sigterm": {"docker_stop_s": m["stop_s"], "exit_code": m["stop_rc"], "grace_s": 60},
        "restart_with_bank": {
            "cold_start_to_ready_s": m["ready_s"], "first_inspection_s": m["first_inspect_s"],
            "docker_stop_s": m["stop2_s"], "exit_code": m["stop2_rc"],
        },
    },
    "checks": [
        "/healthz 200; /readyz 503 with only 'banks' failing before a bank; /v1 without token 401",
        "bank built through POST /v1/banks + GET /v1/jobs/{id}; /readyz 200 after it",
        "good image: normal / no_defect; defective (scratch): anomalous / defect with boxes",
        "audit rows for both request ids (eagle audit --csv in the container)",
        "PID 1 uid 10001 (eagle); docker exec user eagle; HEALTHCHECK healthy",
        "docker stop (SIGTERM): exit 0/143 within the grace period, 'Application shutdown complete', no traceback",
        "docker start with the bank on the /data volume: /readyz 200, inspection still correct",
    ],
}
with open(sys.argv[1], "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
EOF
log "PASSED: results in $RESULTS"
