# Sourced by the GPU check scripts: run their steps one after another within one time budget.
#   BUDGET: seconds for the whole script (each script sets its own default); steps record their outcome in STATUS.
#   step NAME CAP COMMAND...: runs COMMAND for at most CAP seconds, or what is left of the budget if less; a step
#   that fails or is cut short is reported and the next one runs.
END=$((SECONDS + BUDGET))
declare -A STATUS

step() {
    local name=$1 cap=$2 left=$((END - SECONDS))
    shift 2
    ((left < cap)) && cap=$left
    if ((cap < 10)); then
        STATUS[$name]="not run (out of time)"
        echo "=== $name: not run, the budget is spent"
        return
    fi
    echo "=== $name (at most ${cap}s): $*"
    local start=$SECONDS
    timeout --signal=TERM --kill-after=10 "$cap" "$@"
    local rc=$?
    case $rc in
        0) STATUS[$name]="ok" ;;
        124|137) STATUS[$name]="cut at ${cap}s (rc $rc)" ;;
        *) STATUS[$name]="failed (rc $rc)" ;;
    esac
    echo "=== $name: ${STATUS[$name]} in $((SECONDS - start))s"
}

# The header of a check's log: when, which commit, which GPU and driver, which torch and Triton.
header() {
    echo "=== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo 'no git') on" \
         "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
}
