#!/usr/bin/env bash
# tools/device_check.sh: the GPU device check, one script, results as JSON.
#
# On a machine with an NVIDIA GPU, in order, each stage under its own `timeout`
# (shares of --budget-s; time a stage leaves unused goes to the ones after it):
#   install    pip install -e ".[cuda12]"            (unless --skip-install)
#   kernels    the Pallas GPU attention kernel compiled (Triton, not interpreted)
#              against the reference: JAX_SERVE_GPU_TESTS=1 pytest
#              tests/kernels/test_attention_kernels.py -k gpu_compiled
#   bandwidth  tools/bench_kernels.py, decode and prefill shapes of SmolLM2 and of
#              the ~1B Llama, the default backend (pallas_gpu there) and xla
#   serving    python -m serving.main for SmolLM2 (the embedded GGUF) and for a
#              ~1B random Llama (tools/make_random_llama.py), each measured with
#              tools/bench_serving.py at c1 and c32, 128 tokens in / 128 out, ignore_eos
# Each stage writes its JSON (and log) under --out; summary.json lists the
# stages with status (ok / failed / skipped / timeout / planned), seconds,
# files and the commands, plus nvidia-smi's output where there is one. A stage
# that fails does not stop the next; the exit code is 1 if any stage that ran
# failed or timed out, 2 for a bad command line, else 0.
#
# The device tool's machine has no network and returns at most 8 files from
# $OUT: run with --skip-install where JAX for CUDA is already installed (or
# --wheelhouse DIR for carried wheels), write --out outside $OUT and bring back
# the JSON files and a tarball, e.g.
#   tools/device_check.sh --skip-install --out /tmp/dc; cp /tmp/dc/*.json "$OUT"/;
#   tar czf "$OUT/device-check.tgz" -C /tmp dc
# The environment variable PYTHON picks the interpreter (default: python, else python3).

set -euo pipefail

usage() {
  cat <<'EOF'
usage: tools/device_check.sh [--out DIR] [--skip-install] [--wheelhouse DIR]
                             [--only STAGE[,STAGE...]]... [--budget-s N]
                             [--server-args "FLAGS"] [--quick] [--dry-run] [-h]

GPU device check: kernel tests compiled on the GPU, kernel bandwidth, serving
benchmarks (SmolLM2 and a ~1B random Llama, c1 and c32). Results as JSON.

options:
  --out DIR           results folder (default: benchmarks/results/device-<date>)
  --skip-install      do not pip install -e ".[cuda12]"
  --wheelhouse DIR    install offline from the wheels in DIR (pip --no-index --find-links)
  --only STAGES       run only these of kernels, bandwidth, serving (comma list or
                      repeated; install still runs unless --skip-install)
  --budget-s N        seconds for all stages together (default 540)
  --server-args FLAGS extra flags for every python -m serving.main (one string)
  --quick             small shapes, a tiny random Llama in place of both serving
                      models, few requests: a smoke run of the plumbing (CPU too)
  --dry-run           print the commands, write summary.json with the stages as
                      planned, run nothing
  -h, --help          this help
EOF
}

die_usage() {
  echo "device_check.sh: $1" >&2
  usage >&2
  exit 2
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

OUT_DIR=""
SKIP_INSTALL=0
WHEELHOUSE=""
ONLY=""
BUDGET_S=540
DRY_RUN=0
QUICK=0
SERVER_ARGS=""
ARGV_TEXT="$*"

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != -* ]] || die_usage "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) need_value "$@"; OUT_DIR="$2"; shift 2 ;;
    --out=*) OUT_DIR="${1#*=}"; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --wheelhouse) need_value "$@"; WHEELHOUSE="$2"; shift 2 ;;
    --wheelhouse=*) WHEELHOUSE="${1#*=}"; shift ;;
    --only) need_value "$@"; ONLY="$ONLY,$2"; shift 2 ;;
    --only=*) ONLY="$ONLY,${1#*=}"; shift ;;
    --budget-s) need_value "$@"; BUDGET_S="$2"; shift 2 ;;
    --budget-s=*) BUDGET_S="${1#*=}"; shift ;;
    --server-args) [[ $# -ge 2 ]] || die_usage "--server-args needs a value"; SERVER_ARGS="$2"; shift 2 ;;
    --server-args=*) SERVER_ARGS="${1#*=}"; shift ;;
    --quick) QUICK=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die_usage "unknown option: $1" ;;
  esac
done

[[ "$BUDGET_S" =~ ^[0-9]+$ && "$BUDGET_S" -gt 0 ]] || die_usage "--budget-s takes a positive integer, got '$BUDGET_S'"

ALL_STAGES=(kernels bandwidth serving)
declare -A SELECTED=()
if [[ -z "$ONLY" ]]; then
  for s in "${ALL_STAGES[@]}"; do SELECTED[$s]=1; done
else
  IFS=',' read -r -a _only <<<"$ONLY"
  for s in "${_only[@]}"; do
    [[ -z "$s" ]] && continue
    case "$s" in
      kernels|bandwidth|serving) SELECTED[$s]=1 ;;
      *) die_usage "--only takes kernels, bandwidth or serving, got '$s'" ;;
    esac
  done
  [[ ${#SELECTED[@]} -gt 0 ]] || die_usage "--only needs at least one stage"
fi
[[ -n "$WHEELHOUSE" && "$SKIP_INSTALL" == 1 ]] && die_usage "--wheelhouse and --skip-install exclude each other"

if [[ -z "${PYTHON:-}" ]]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
PY="$PYTHON"
STARTED_AT="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
OUT_DIR="${OUT_DIR:-benchmarks/results/device-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")"  # caches, the random checkpoint
RECORDS="$OUT_DIR/.stages.tsv"
: >"$RECORDS"
rm -f "$OUT_DIR"/.commands.*
T0=$SECONDS
DEADLINE=$((SECONDS + BUDGET_S))
SERVER_PGIDS=()
DRY_SPENT=0  # --dry-run: the planned timeouts, as if each stage used all of its own

cleanup() {
  local pg
  for pg in "${SERVER_PGIDS[@]:-}"; do
    [[ -n "$pg" ]] && kill -TERM -- "-$pg" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "[device_check $(( SECONDS - T0 ))s] $*" >&2; }

# The planned order: install first, then the selected stages.
PLAN=()
[[ "$SKIP_INSTALL" == 0 ]] && PLAN+=(install)
for s in "${ALL_STAGES[@]}"; do [[ -n "${SELECTED[$s]:-}" ]] && PLAN+=("$s"); done
declare -A WEIGHT=([install]=2 [kernels]=2 [bandwidth]=1 [serving]=6)

# stage_timeout STAGE: seconds for STAGE, its weight's share of what is left
# among it and the planned stages after it (0 when the budget is spent).
stage_timeout() {
  local stage="$1" total=0 seen=0 s left
  for s in "${PLAN[@]}"; do
    [[ "$s" == "$stage" ]] && seen=1
    [[ "$seen" == 1 ]] && total=$((total + WEIGHT[$s]))
  done
  left=$((DEADLINE - SECONDS - DRY_SPENT))
  if [[ "$left" -le 0 ]]; then echo 0; else echo $(( left * WEIGHT[$stage] / total > 1 ? left * WEIGHT[$stage] / total : 1 )); fi
}

# share DEADLINE_ABS WEIGHT REST_WEIGHTS: the same split inside a stage.
share() {
  local left=$(( $1 - SECONDS ))
  [[ "$left" -le 0 ]] && { echo 0; return; }
  local t=$(( left * $2 / ($2 + $3) ))
  echo $(( t > 1 ? t : 1 ))
}

# record STAGE STATUS SECONDS TIMEOUT "FILES" "REASON"
record() {
  local reason="${6:-}"
  reason="${reason//$'\t'/ }"
  reason="${reason//$'\n'/ }"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${reason:0:500}" >>"$RECORDS"
  [[ "$DRY_RUN" == 1 ]] && DRY_SPENT=$((DRY_SPENT + $4))
  log "$1: $2${reason:+ ($reason)}"
}

# note_cmd STAGE CMD...: keeps the command (shell-quoted) for summary.json.
note_cmd() {
  local stage="$1"; shift
  local q
  q="$(printf '%q ' "$@")"
  echo "${q% }" >>"$OUT_DIR/.commands.$stage"
  if [[ "$DRY_RUN" == 1 ]]; then echo "[$stage] ${q% }"; fi
}

# run_logged TIMEOUT LOG CMD...: runs CMD under timeout, output to LOG; returns its status.
run_logged() {
  local t="$1" logf="$2"; shift 2
  local rc=0
  timeout -k 10 "$t" "$@" >"$logf" 2>&1 || rc=$?
  return "$rc"
}

status_of() {  # exit status -> ok / timeout / failed
  case "$1" in
    0) echo ok ;;
    124|137) echo timeout ;;
    *) echo failed ;;
  esac
}

# why RC (after a TIMEOUT-second limit) is not ok, with the end of LOG.
why() {
  case "$1" in
    0) ;;
    124|137) echo "stopped at its ${2}s timeout: $(tail_of "$3")" ;;
    *) echo "exit $1: $(tail_of "$3")" ;;
  esac
}

tail_of() { [[ -f "$1" ]] && tail -c 300 "$1" | tr '\n\t' '  ' || true; }

# ---------------------------------------------------------------- install
stage_install() {
  local t log="$OUT_DIR/install.log" rc=0 start=$SECONDS
  local cmd=("$PY" -m pip install -e ".[cuda12]")
  [[ -n "$WHEELHOUSE" ]] && cmd=("$PY" -m pip install --no-index --find-links "$WHEELHOUSE" -e ".[cuda12]")
  note_cmd install "${cmd[@]}"
  t=$(stage_timeout install)
  if [[ "$DRY_RUN" == 1 ]]; then record install planned 0 "$t" "$log" ""; return; fi
  [[ "$t" -gt 0 ]] || { record install timeout 0 0 "" "budget spent before the stage"; return; }
  run_logged "$t" "$log" "${cmd[@]}" || rc=$?
  local st; st=$(status_of "$rc")
  record install "$st" $((SECONDS - start)) "$t" "$log" "$(why "$rc" "$t" "$log")"
}

# ---------------------------------------------------------------- kernels
stage_kernels() {
  local t log="$OUT_DIR/kernels.log" xml="$OUT_DIR/kernels.xml" js="$OUT_DIR/kernels.json"
  local rc=0 start=$SECONDS
  local cmd=(env JAX_SERVE_GPU_TESTS=1 "$PY" -m pytest -q -n 0 -p no:cacheprovider
             tests/kernels/test_attention_kernels.py -k gpu_compiled -rs --junitxml "$xml")
  note_cmd kernels "${cmd[@]}"
  t=$(stage_timeout kernels)
  if [[ "$DRY_RUN" == 1 ]]; then record kernels planned 0 "$t" "$js $log" ""; return; fi
  [[ "$t" -gt 0 ]] || { record kernels timeout 0 0 "" "budget spent before the stage"; return; }
  rm -f "$xml"
  run_logged "$t" "$log" "${cmd[@]}" || rc=$?
  # kernels.json from the JUnit XML; prints "STATUS<TAB>REASON".
  local verdict
  verdict=$("$PY" - "$xml" "$js" "$rc" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
xml_path, js_path, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
tests, counts = [], {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
try:
    root = ET.parse(xml_path).getroot()
except (OSError, ET.ParseError):
    root = None
for case in ([] if root is None else root.iter("testcase")):
    outcome, message = "passed", None
    for kind in ("failure", "error", "skipped"):
        el = case.find(kind)
        if el is not None:
            outcome = {"failure": "failed"}.get(kind, kind)
            message = (el.get("message") or el.text or "")[:400]
            break
    counts[outcome] += 1
    tests.append({"name": case.get("name"), "outcome": outcome,
                  "seconds": float(case.get("time") or 0), "message": message})
if rc in (124, 137):
    status, reason = "timeout", f"pytest stopped at the stage timeout after {len(tests)} tests"
elif rc == 0 and counts["passed"] > 0:
    status, reason = "ok", ""
elif rc == 0:
    skips = sorted({t["message"] for t in tests if t["outcome"] == "skipped"})
    status, reason = "skipped", "no test ran: " + ("; ".join(skips) or "none collected")
elif rc == 5:
    status, reason = "failed", "no GPU-compiled test collected (JAX_SERVE_GPU_TESTS switch missing?)"
else:
    status, reason = "failed", f"pytest exit {rc}: {counts['failed']} failed, {counts['error']} errors"
json.dump({"stage": "kernels", "status": status, "reason": reason, "pytest_exit": rc,
           "counts": counts, "tests": tests}, open(js_path, "w"), indent=2)
print(f"{status}\t{reason}")
PYEOF
) || verdict=$'failed\tcould not read the pytest results'
  record kernels "${verdict%%$'\t'*}" $((SECONDS - start)) "$t" "$js $xml $log" "${verdict#*$'\t'}"
}

# ---------------------------------------------------------------- bandwidth
# Each entry: name, then bench_kernels flags (the backend is added per run).
if [[ "$QUICK" == 1 ]]; then
  BW_CONFIGS=("tiny_decode --num-seqs 2 --context-len 64 --q-len 1 --num-q-heads 4 --num-kv-heads 2 --head-dim 64 --page-size 16 --dtype float32 --warmup 1 --iters 3")
  BW_BACKENDS=(auto)
else
  BW_CONFIGS=(
    "smollm2_decode --num-seqs 32 --context-len 2048 --q-len 1 --num-q-heads 9 --num-kv-heads 3 --head-dim 64 --page-size 16 --dtype bfloat16"
    "llama1b_decode --num-seqs 32 --context-len 2048 --q-len 1 --num-q-heads 32 --num-kv-heads 8 --head-dim 64 --page-size 16 --dtype bfloat16"
    "llama1b_prefill --num-seqs 4 --context-len 2048 --q-len 512 --num-q-heads 32 --num-kv-heads 8 --head-dim 64 --page-size 16 --dtype bfloat16 --iters 10"
  )
  BW_BACKENDS=(auto xla)
fi

stage_bandwidth() {
  local t log="$OUT_DIR/bandwidth.log" js="$OUT_DIR/bandwidth.json" rc=0 start=$SECONDS
  local specs=() c b name flags
  for c in "${BW_CONFIGS[@]}"; do
    name="${c%% *}"; flags="${c#* }"
    for b in "${BW_BACKENDS[@]}"; do specs+=("$name/$b" "--backend $b $flags"); done
  done
  local cmd=("$PY" - "$js" "${specs[@]}")
  local i
  for ((i = 0; i < ${#specs[@]}; i += 2)); do
    # shellcheck disable=SC2086
    note_cmd bandwidth "$PY" tools/bench_kernels.py ${specs[i+1]}
  done
  t=$(stage_timeout bandwidth)
  if [[ "$DRY_RUN" == 1 ]]; then record bandwidth planned 0 "$t" "$js $log" ""; return; fi
  [[ "$t" -gt 0 ]] || { record bandwidth timeout 0 0 "" "budget spent before the stage"; return; }
  # All configurations in one process (one JAX start-up); bench_kernels' own
  # --json where it has one, else the rows its run() returns.
  run_logged "$t" "$log" "${cmd[@]}" <<'PYEOF' || rc=$?
import json, os, shlex, sys, tempfile, time, traceback
import jax
import tools.bench_kernels as bk

out, specs = sys.argv[1], sys.argv[2:]
has_json = "--json" in open(bk.__file__).read()
dev = jax.devices()[0]
res = {"stage": "bandwidth", "jax": jax.__version__, "platform": dev.platform,
       "device": dev.device_kind, "configs": []}
orig_run, captured = bk.run, []


def _run(a):
    rows = orig_run(a)
    captured.extend(rows)
    return rows


bk.run = _run
failed = 0
for name, flags in zip(specs[::2], specs[1::2]):
    argv = shlex.split(flags)
    entry = {"name": name, "argv": argv}
    captured.clear()
    t0 = time.perf_counter()
    try:
        if has_json:
            fd, tmp = tempfile.mkstemp(suffix=".json"); os.close(fd)
            bk.main(argv + ["--json", tmp])
            try:
                entry["bench_json"] = json.load(open(tmp))
            except ValueError:
                entry["bench_json"] = None
            os.unlink(tmp)
        else:
            bk.main(argv)
        entry["rows"] = list(captured)
    except BaseException as e:  # argparse exits too
        failed += 1
        entry["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    res["configs"].append(entry)
    json.dump(res, open(out, "w"), indent=2)  # what finished, if the stage times out
    print(f"{name}: {entry.get('rows') or entry.get('error')}", flush=True)
sys.exit(1 if failed else 0)
PYEOF
  local st; st=$(status_of "$rc")
  record bandwidth "$st" $((SECONDS - start)) "$t" "$js $log" "$(why "$rc" "$t" "$log")"
}

# ---------------------------------------------------------------- serving
if [[ "$QUICK" == 1 ]]; then
  IN_LEN=16; OUT_LEN=8; N_C1=2; N_C32=8; WARM_C32=4; MAX_LEN=128
  TINY_FLAGS=(--hidden-size 64 --num-layers 2 --num-heads 4 --num-kv-heads 2 --intermediate-size 96 --vocab-size 2048)
else
  IN_LEN=128; OUT_LEN=128; N_C1=8; N_C32=64; WARM_C32=32; MAX_LEN=512
  TINY_FLAGS=()
fi
SERVE_FLAGS=(--host 127.0.0.1 --max-num-seqs 32 --max-model-len "$MAX_LEN" --compile-cache-dir "$WORK/xla")
[[ "$QUICK" == 0 ]] && SERVE_FLAGS+=(--dtype bfloat16)

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# bench_serving through a shim that keeps its prompt ids below the model's
# vocabulary (it draws them from SmolLM2's 49152-token vocabulary).
BENCH_SHIM='import sys
from tools import bench_serving as bs
vocab = int(sys.argv[1])
if vocab and hasattr(bs, "_word_pool"):
    pool = bs._word_pool
    bs._word_pool = lambda tok: [i for i in pool(tok) if i < vocab]
sys.exit(bs.main(sys.argv[2:]))'

# serve_model NAME DEADLINE VOCAB MODEL_FLAGS...: start, c1, c32, stop. Writes
# serving/NAME-*.json; appends "NAME<TAB>STATUS<TAB>REASON" to $SERVING_RESULTS.
serve_model() {
  local name="$1" deadline="$2" vocab="$3"; shift 3
  local dir="$OUT_DIR/serving" port t rc=0 pid=""
  port=$(free_port 2>/dev/null || echo 8321)
  local server=("$PY" -m serving.main --port "$port" "${SERVE_FLAGS[@]}" "$@")
  # shellcheck disable=SC2206
  [[ -n "$SERVER_ARGS" ]] && server+=($SERVER_ARGS)
  local start_cmd=("$PY" tools/bench_startup.py --port "$port" --keep --prompt-len 16
                   --max-tokens 4 --json "$dir/$name-startup.json" --log "$dir/$name-server.log")
  note_cmd serving "${start_cmd[@]}" --timeout T -- "${server[@]}"
  local conc n warm
  for conc in 1 32; do
    n=$N_C1; warm=1; [[ $conc == 32 ]] && { n=$N_C32; warm=$WARM_C32; }
    note_cmd serving "$PY" tools/bench_serving.py --base-url "http://127.0.0.1:$port" \
      --concurrency "$conc" --num-prompts "$n" --warmup "$warm" --input-len "$IN_LEN" \
      --output-len "$OUT_LEN" --ignore-eos --json "$dir/$name-c$conc.json" --label "$name c$conc"
  done
  [[ "$DRY_RUN" == 1 ]] && return 0
  t=$(share "$deadline" 5 5)
  [[ "$t" -gt 0 ]] || { printf '%s\ttimeout\tbudget spent before the server start\n' "$name" >>"$SERVING_RESULTS"; return 0; }
  log "serving $name: starting (timeout ${t}s)"
  run_logged "$((t + 15))" "$dir/$name-startup.log" "${start_cmd[@]}" --timeout "$t" -- "${server[@]}" || rc=$?
  if [[ "$rc" != 0 ]]; then
    local st; st=$(status_of "$rc")
    grep -q "not ready before --timeout" "$dir/$name-startup.log" 2>/dev/null && st=timeout
    printf '%s\t%s\tserver start: %s\n' "$name" "$st" "$(why "$rc" "$t" "$dir/$name-startup.log")" >>"$SERVING_RESULTS"
    return 0
  fi
  pid=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["pid"])' "$dir/$name-startup.json")
  SERVER_PGIDS+=("$pid")
  local status=ok reason="" w
  for conc in 1 32; do
    n=$N_C1; warm=1; w=2; [[ $conc == 32 ]] && { n=$N_C32; warm=$WARM_C32; w=3; }
    t=$(share "$deadline" "$w" "$([[ $conc == 1 ]] && echo 3 || echo 0)")
    if [[ "$t" -le 0 ]]; then status=timeout; reason="$reason c$conc: budget spent;"; continue; fi
    rc=0
    log "serving $name: c$conc (timeout ${t}s)"
    run_logged "$t" "$dir/$name-c$conc.log" "$PY" -c "$BENCH_SHIM" "$vocab" \
      --base-url "http://127.0.0.1:$port" --concurrency "$conc" --num-prompts "$n" \
      --warmup "$warm" --input-len "$IN_LEN" --output-len "$OUT_LEN" --ignore-eos \
      --timeout "$t" --json "$dir/$name-c$conc.json" --label "$name c$conc" || rc=$?
    if [[ "$rc" != 0 ]]; then
      [[ "$(status_of "$rc")" == timeout && "$status" == ok ]] && status=timeout
      [[ "$(status_of "$rc")" == failed ]] && status=failed
      reason="$reason c$conc: $(why "$rc" "$t" "$dir/$name-c$conc.log");"
    fi
  done
  kill -TERM -- "-$pid" 2>/dev/null || true
  local k
  for k in $(seq 1 40); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  printf '%s\t%s\t%s\n' "$name" "$status" "$reason" >>"$SERVING_RESULTS"
}

stage_serving() {
  local t js="$OUT_DIR/serving.json" start=$SECONDS dir="$OUT_DIR/serving"
  mkdir -p "$dir"
  SERVING_RESULTS="$WORK/serving.tsv"
  : >"$SERVING_RESULTS"
  t=$(stage_timeout serving)
  local end=$((SECONDS + t)) ckpt="$WORK/llama" llama_name=llama1b
  [[ "$QUICK" == 1 ]] && llama_name=tiny_llama
  local make_cmd=("$PY" tools/make_random_llama.py --out "$ckpt" "${TINY_FLAGS[@]}"
                  --json "$dir/$llama_name-checkpoint.json")
  local vocab=32000
  [[ "$QUICK" == 1 ]] && vocab=2048
  if [[ "$DRY_RUN" == 1 ]]; then
    [[ "$QUICK" == 0 ]] && serve_model smollm2 0 0
    note_cmd serving "${make_cmd[@]}"
    serve_model "$llama_name" 0 "$vocab" --model "$ckpt" --served-model-name "$llama_name"
    record serving planned 0 "$t" "$js" ""
    return
  fi
  [[ "$t" -gt 0 ]] || { record serving timeout 0 0 "" "budget spent before the stage"; return; }
  if [[ "$QUICK" == 0 ]]; then
    # SmolLM2 gets 2/5 of the stage, the random Llama (checkpoint included) the rest.
    serve_model smollm2 $((SECONDS + $(share "$end" 2 3))) 0
  fi
  note_cmd serving "${make_cmd[@]}"
  local rc=0 tm
  tm=$(share "$end" 1 3)
  log "serving: writing the random Llama (timeout ${tm}s)"
  if [[ "$tm" -gt 0 ]] && run_logged "$tm" "$dir/$llama_name-checkpoint.log" "${make_cmd[@]}"; then
    serve_model "$llama_name" "$end" "$vocab" --model "$ckpt" --served-model-name "$llama_name"
  else
    rc=$?
    printf '%s\t%s\tcheckpoint: %s\n' "$llama_name" "$(status_of "$rc")" \
      "$(why "$rc" "$tm" "$dir/$llama_name-checkpoint.log")" >>"$SERVING_RESULTS"
  fi
  local verdict
  verdict=$("$PY" - "$SERVING_RESULTS" "$dir" "$js" <<'PYEOF'
import json, os, sys
results, folder, out = sys.argv[1:4]
def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None
models = {}
for line in open(results):
    name, status, reason = (line.rstrip("\n").split("\t") + ["", ""])[:3]
    entry = {"status": status, "reason": reason.strip() or None}
    ckpt = load(os.path.join(folder, f"{name}-checkpoint.json"))
    if ckpt:
        entry["checkpoint"] = ckpt
    st = load(os.path.join(folder, f"{name}-startup.json"))
    entry["startup"] = None if st is None else {k: st.get(k) for k in (
        "cmd", "ready_s", "first_token_s", "first_request_ttft_s", "startup", "phases",
        "compiles_after_first_request")}
    for c in ("c1", "c32"):
        b = load(os.path.join(folder, f"{name}-{c}.json"))
        entry[c] = None if b is None else {"summary": b.get("summary"), "args": b.get("args"),
                                           "model": b.get("model")}
    models[name] = entry
statuses = [m["status"] for m in models.values()]
status = ("failed" if "failed" in statuses else "timeout" if "timeout" in statuses
          else "ok" if statuses else "failed")
reason = "; ".join(f"{n}: {m['reason']}" for n, m in models.items() if m["reason"])
json.dump({"stage": "serving", "status": status, "models": models}, open(out, "w"), indent=2)
print(f"{status}\t{reason}")
PYEOF
) || verdict=$'failed\tcould not collect the serving results'
  record serving "${verdict%%$'\t'*}" $((SECONDS - start)) "$t" "$js $dir" "${verdict#*$'\t'}"
}

# ---------------------------------------------------------------- main
log "out: $OUT_DIR; budget ${BUDGET_S}s; stages: ${PLAN[*]:-none}$([[ $DRY_RUN == 1 ]] && echo ' (dry run)')"
[[ "$SKIP_INSTALL" == 1 ]] && record install skipped 0 0 "" "--skip-install"
for s in "${PLAN[@]}"; do
  "stage_$s" || record "$s" failed 0 0 "" "the stage's own script broke (exit $?)"
done
for s in "${ALL_STAGES[@]}"; do
  [[ -z "${SELECTED[$s]:-}" ]] && record "$s" skipped 0 0 "" "not in --only"
done

NVSMI="$OUT_DIR/nvidia-smi.txt"
if command -v nvidia-smi >/dev/null 2>&1; then
  timeout 30 nvidia-smi >"$NVSMI" 2>&1 || true
  timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv >>"$NVSMI" 2>&1 || true
else
  rm -f "$NVSMI"
fi

DC_STARTED="$STARTED_AT" DC_ELAPSED=$((SECONDS - T0)) DC_BUDGET="$BUDGET_S" DC_DRY="$DRY_RUN" \
DC_QUICK="$QUICK" DC_ARGV="$ARGV_TEXT" DC_PY="$PY" \
"$PY" - "$OUT_DIR" "$RECORDS" "$NVSMI" <<'PYEOF'
import glob, json, os, platform, subprocess, sys
out, records, nvsmi = sys.argv[1:4]
order = ["install", "kernels", "bandwidth", "serving"]
stages = {}
for line in open(records):
    name, status, secs, timeout_s, files, reason = line.rstrip("\n").split("\t")
    cmds = os.path.join(out, f".commands.{name}")
    stages[name] = {"name": name, "status": status, "seconds": int(secs),
                    "timeout_s": int(timeout_s), "files": files.split(),
                    "reason": reason or None,
                    "commands": open(cmds).read().splitlines() if os.path.exists(cmds) else []}
def git(*a):
    try:
        return subprocess.run(["git", *a], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
env = os.environ
dry = env["DC_DRY"] == "1"
jax_info = None
if not dry:  # what JAX sees, in a process of its own (it may fail to start)
    code = ("import jax, json; d = jax.devices(); print(json.dumps({'jax': jax.__version__, "
            "'backend': jax.default_backend(), 'devices': [x.device_kind for x in d]}))")
    try:
        p = subprocess.run([env["DC_PY"], "-c", code], capture_output=True, text=True,
                           timeout=120)
        jax_info = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 \
            else {"error": p.stderr[-500:]}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        jax_info = {"error": f"{type(e).__name__}: {e}"}
summary = {
    "started": env["DC_STARTED"], "elapsed_s": int(env["DC_ELAPSED"]),
    "budget_s": int(env["DC_BUDGET"]), "dry_run": dry, "quick": env["DC_QUICK"] == "1",
    "argv": env["DC_ARGV"], "out": out, "host": platform.node(), "python": env["DC_PY"],
    "jax": jax_info,
    "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
    "stages": [stages[n] for n in order if n in stages],
    "nvidia_smi": open(nvsmi).read() if os.path.exists(nvsmi) else None,
}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
for f in glob.glob(os.path.join(out, ".commands.*")) + [records]:
    os.unlink(f)
print(os.path.join(out, "summary.json"))
PYEOF

[[ "$DRY_RUN" == 1 ]] && exit 0
"$PY" -c 'import json, sys; s = json.load(open(sys.argv[1]))
sys.exit(1 if any(x["status"] in ("failed", "timeout") for x in s["stages"]) else 0)' "$OUT_DIR/summary.json"
