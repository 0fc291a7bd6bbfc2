#!/usr/bin/env bash
# The GPU figures benchmarks/RESULTS.md asks for, in one go on one GPU:
#   - training gpt_small (12 layers, d_model 768, seq 1024, batch 32) in bfloat16: tokens/s,
#     MFU, step and compile time, peak memory and the attention that ran; then the same
#     with XLA's attention instead of cuDNN's, for the kernel's share;
#   - greedy decoding of the peer shape in bfloat16, batch 1 and 8;
#   - speculative decoding: a gpt_tiny target (4 layers) and a draft of one layer, each
#     trained 600 steps on the embedded corpus, K = 2, 3, 4.
# Each benchmark writes its JSON line to DIR/results.jsonl (a DIR that holds one already is
# refused; on the device machine of this workplace, pass "$OUT"), the logs go to
# DIR/log.txt. Each step has a time limit; one that fails or runs out is reported and the
# others still run; the exit status is 1 if any failed.
#
#   bash scripts/gpu_benchmarks.sh [DIR [PART...]]
#
# DIR defaults to the checkout's runs/gpu_benchmarks; PARTs (train, decode, speculative;
# all by default) run a share of the set, e.g. to fit a limit on one command's time: the
# steps' limits add up to 400 s for train, 240 s for decode and 420 s for speculative: with
# the 30 s each step is given to stop, 460, 300 and 510 s at worst, plus the setup (the
# wheels' install, one JAX import), within a 600 s command.
#
# On a machine without PyPI, first run scripts/offline_wheels.sh where pip works and copy
# .whl/ along: its wheels are installed here into a folder of their own.
set -uo pipefail
# DIR before the cd: relative to the caller's folder.
out=$(realpath -m "${1:-$(dirname "$0")/../runs/gpu_benchmarks}") || exit 1
parts=("${@:2}")
[ ${#parts[@]} -gt 0 ] || parts=(train decode speculative)
for part in "${parts[@]}"; do
  case $part in
    train|decode|speculative) ;;
    *) echo "unknown PART '$part': give train, decode or speculative (or none: all)" >&2
       exit 1 ;;
  esac
done
wants() { [[ " ${parts[*]} " == *" $1 "* ]]; }
cd "$(dirname "$0")/.." || exit 1
if [ -e "$out/results.jsonl" ]; then
  echo "$out/results.jsonl exists: give another DIR (nothing is overwritten)." >&2
  exit 1
fi
mkdir -p "$out" || exit 1
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/offline_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/offline_site${PYTHONPATH:+:$PYTHONPATH}
fi
{ if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  fi
  "$python" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__,
                                         jax.devices())'; } > "$out/env.txt" 2>&1
cat "$out/env.txt"

failed=0
bench() {  # bench SECONDS ARGS...: one benchmark, its JSON line to results.jsonl
  local limit=$1; shift
  echo "== $*" | tee -a "$out/log.txt"
  local start=$SECONDS
  local printed last
  printed=$(timeout -k 30 "$limit" "$python" "$@" --json 2>> "$out/log.txt")
  local rc=$?
  printf '%s\n' "$printed" >> "$out/log.txt"
  echo "rc $rc after $((SECONDS - start)) s" | tee -a "$out/log.txt"
  last=$(printf '%s\n' "$printed" | tail -n 1)
  if [ $rc -eq 0 ] && "$python" -c 'import json, sys; json.loads(sys.argv[1])' "$last" \
      2> /dev/null; then
    printf '%s\n' "$last" | tee -a "$out/results.jsonl"
  else
    echo 'no JSON line: see log.txt' | tee -a "$out/log.txt"
    failed=1
  fi
}

if wants train; then
  gpt_small=(-m benchmarks.train_step --config=configs/gpt_small.py --steps=20
             --config.dtype=bfloat16)
  bench 200 "${gpt_small[@]}"
  bench 200 "${gpt_small[@]}" --config.model.attention=xla
fi
if wants decode; then
  for batch in 1 8; do
    bench 120 -m benchmarks.decode --dtype=bfloat16 --batch=$batch --new_tokens=256
  done
fi
wants speculative || exit $failed

# Speculative decoding needs a target and a draft that agree: train both (the draft on
# the target's tokenizer), then time K = 2, 3, 4 against plain greedy.
runs=$(mktemp -d) || exit 1
trap 'rm -rf "$runs"' EXIT
mkdir -p "$runs/draft" || exit 1
train() {  # train WORKDIR [FLAGS...]: a gpt_tiny run
  timeout -k 30 140 "$python" main.py --config=configs/gpt_tiny.py --workdir="$1" "${@:2}" \
      >> "$out/log.txt" 2>&1
}
if train "$runs/target" && cp "$runs/target/tokenizer.model" "$runs/draft/" \
    && train "$runs/draft" --config.model.num_layers=1; then
  bench 140 -m benchmarks.speculative --target_workdir="$runs/target" \
      --draft_workdir="$runs/draft" --num_draft_tokens=2,3,4
else
  echo 'training the speculative target or draft failed: see log.txt' | tee -a "$out/log.txt"
  failed=1
fi
exit $failed
