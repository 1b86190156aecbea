#!/usr/bin/env bash
# Re-take docs/mlflow_compare.png: the MLflow UI's compare page for the three methods.
#
# In a scratch directory outside the repo it generates the demo corpus, runs V-FT, TAPT and
# P-TAPT one after another into one SQLite store, writes the compare table and chart, starts a
# real `mlflow server` on 127.0.0.1, and shoots the compare page of the three method parent runs
# with headless Chromium (scripts/screenshot_ui.py drives it). The server is stopped on exit.
#
# Usage:  scripts/screenshot_ui.sh     (10-15 min on 2 idle CPU cores; over an hour on a busy box)
# Every setting below can be overridden from the environment, e.g. WORK=/tmp/x PORT=5056 ...
# WORK=<an earlier scratch dir> resumes there: finished stages are reused, not recomputed.
# TRAIN=0 WORK=<an earlier scratch dir> skips the method runs and only re-shoots the UI.
set -euo pipefail

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PY=${PY:-$REPO/.venv/bin/python}
WORK=${WORK:-$(mktemp -d /tmp/ser-ui-demo.XXXXXX)}  # fresh: a reused store would reuse stages
PORT=${PORT:-5055}
CHROMIUM=${CHROMIUM:-chromium}
SHOT=${SHOT:-$REPO/docs/mlflow_compare.png}
CHART=${CHART:-$REPO/docs/compare_chart.png}
NICE=${NICE:-10}  # the methods train on CPU; be polite to whoever shares the machine
TRAIN=${TRAIN:-1}

URL_BASE="http://127.0.0.1:$PORT"
export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"
SERVER_PID=""

log() { printf '[screenshot_ui] %s\n' "$*" >&2; }

stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        log "stopping mlflow server (pid $SERVER_PID)"
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
    fi
    # The server was started in its own session, so its workers share its process group. They
    # follow the main process down within seconds; end any straggler of that group (only it).
    for _ in $(seq 20); do pgrep -g "$SERVER_PID" >/dev/null 2>&1 || break; sleep 0.5; done
    if pgrep -g "$SERVER_PID" >/dev/null 2>&1; then
        log "server processes left in group $SERVER_PID; terminating them"
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
        sleep 5
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

need_chromium() {
    command -v "$CHROMIUM" >/dev/null && return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing chromium (Debian package)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
    else
        log "chromium not found: install it (Debian: apt-get install chromium) or set CHROMIUM=..."
        exit 1
    fi
}

timed() {  # timed NAME CMD...: run CMD, append to $WORK/logs/NAME.log, report its wall clock
    local name=$1 start ms status=0
    shift
    start=$(date +%s%N)
    echo "=== $(date -u +%FT%TZ) $*" >>"$WORK/logs/$name.log"  # a resumed run keeps the old log
    "$@" >>"$WORK/logs/$name.log" 2>&1 || status=$?
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    printf '%s\t%d.%01d s\texit %d\n' "$name" $((ms / 1000)) $((ms % 1000 / 100)) "$status" \
        | tee -a "$WORK/logs/timings.tsv" >&2
    if [[ $status -ne 0 ]]; then
        log "$name failed; last lines of $WORK/logs/$name.log:"
        tail -n 20 "$WORK/logs/$name.log" >&2
        exit "$status"
    fi
}

[[ -x "$PY" ]] || { log "no python at $PY: create the project's venv or set PY=..."; exit 1; }
if curl -sf "$URL_BASE/health" >/dev/null 2>&1; then
    log "something already answers on $URL_BASE: stop it or set PORT=..."
    exit 1
fi
need_chromium
mkdir -p "$WORK/logs" "$(dirname "$SHOT")" "$(dirname "$CHART")"
cd "$WORK"
log "scratch directory: $WORK"

# 1. Demo corpus, the three methods (one after another: they each use every core), comparison.
if [[ "$TRAIN" != 0 ]]; then
    timed demo_corpus "$PY" "$REPO/entrypoints/demo_corpus.py" --output_dir data/demo
    for method in vft tapt ptapt; do
        timed "$method" nice -n "$NICE" "$PY" "$REPO/entrypoints/$method.py"
    done
elif [[ ! -f "$WORK/mlflow.db" ]]; then
    log "TRAIN=0 needs WORK set to an earlier scratch dir with mlflow.db in it"
    exit 1
fi
timed compare "$PY" "$REPO/entrypoints/compare.py" --output_dir compare
cp compare/comparison.png "$CHART"
cat compare/comparison.md >&2

# 2. A real tracking server on the loopback address only. One worker is plenty for one browser.
setsid "$PY" -m mlflow server --host 127.0.0.1 --port "$PORT" --workers 1 \
    --backend-store-uri "$MLFLOW_TRACKING_URI" --default-artifact-root "$WORK/mlruns" \
    >"$WORK/logs/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 120); do
    curl -sf "$URL_BASE/health" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { log "server died: see $WORK/logs/server.log"; exit 1; }
    sleep 1
done
curl -sf "$URL_BASE/health" >/dev/null || { log "server not healthy after 120 s"; exit 1; }
log "mlflow server up at $URL_BASE (pid $SERVER_PID)"

# 3. The parent run of each method, asked of the server itself: it carries the method's
# headline metrics and no parent (its stage runs carry ser.method too, and some the metrics).
read -r RUNS EXPERIMENTS < <(URL_BASE=$URL_BASE "$PY" - <<'EOF'
import json
import os
import urllib.request


def post(endpoint, body):
    request = urllib.request.Request(
        os.environ["URL_BASE"] + "/api/2.0/mlflow/" + endpoint,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as reply:
        return json.load(reply)


experiments = post("experiments/search", {"max_results": 1000}).get("experiments", [])
runs = post("runs/search", {
    "experiment_ids": [e["experiment_id"] for e in experiments],
    "filter": "attributes.status = 'FINISHED' and metrics.test_UA_mean >= 0",
    "order_by": ["attributes.start_time DESC"],
    "max_results": 1000,
}).get("runs", [])
newest = {}
for run in runs:
    tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
    if "mlflow.parentRunId" not in tags and "ser.method" in tags:
        newest.setdefault(tags["ser.method"], run["info"])
missing = {"vft", "tapt", "ptapt"} - newest.keys()
if missing:
    raise SystemExit(f"no finished parent run for {sorted(missing)} on the server")
chosen = [newest[m] for m in ("vft", "tapt", "ptapt")]
print(json.dumps([i["run_id"] for i in chosen], separators=(",", ":")),
      json.dumps(sorted({i["experiment_id"] for i in chosen}), separators=(",", ":")))
EOF
)
URL="$URL_BASE/#/compare-runs?runs=$RUNS&experiments=$EXPERIMENTS"
log "compare page: $URL"
first_run=$(echo "$RUNS" | tr -d '[]"' | cut -d, -f1)
# "Show diff only" keeps the parameters that tell the methods apart and drops all-zero metrics,
# so the headline UA/WA/F1 rows fit in the metrics list without scrolling.
"$PY" "$REPO/scripts/screenshot_ui.py" "$URL" "$SHOT" --chromium "$CHROMIUM" --full \
    --max_height 3000 --expect "Comparing 3 Runs" --expect test_UA_mean --expect "$first_run" \
    --click "Parameters - Show diff only" --click "Metrics - Show diff only"

# 4. Stop the server now rather than at exit, and check that nothing of it is left.
stop_server
if curl -s -m 3 "$URL_BASE/health" >/dev/null 2>&1; then
    log "something still answers on $URL_BASE after stopping the server"
    exit 1
fi
log "done: $SHOT, $CHART; runs, logs and compare table in $WORK"
