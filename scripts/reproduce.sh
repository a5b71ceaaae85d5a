#!/usr/bin/env bash
# Reproduce the poster's figures on offline data, then write an HTML report.
#
#   bash scripts/reproduce.sh            quick presets, default stages logreg mnist-mlp mnist-cnn compare:
#                                        the trade-off on LR, MLP and CNN (10.3 min of CPU time)
#   bash scripts/reproduce.sh --medium   the reference length on a CPU: MNIST-LR for 1000 epochs and the
#                                        MNIST-MLP recipes over 3 seeds for 200 epochs (default stages
#                                        mnist-lr compare; hours on 2 cores, see docs/results.md)
#   bash scripts/reproduce.sh --full     the reference settings (hundreds of epochs: meant for a GPU)
#   bash scripts/reproduce.sh logreg     only some stages: logreg, mnist-lr, mnist-mlp, mnist-cnn, fashion-cnn,
#                                        compare (each one runs configs/<stage>-<preset>.toml)
#
# Results go to results/<config>/ (run directories) and results/report/report.html. Finished runs are
# skipped and interrupted ones resumed, so the script can simply be run again after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."

preset=quick
stages=()
for arg in "$@"; do
  case "$arg" in
    --full) preset=full ;;
    --medium) preset=medium ;;
    --quick) preset=quick ;;
    logreg|mnist-lr|mnist-mlp|mnist-cnn|fashion-cnn|compare) stages+=("$arg") ;;
    *) echo "reproduce.sh: unknown argument '$arg' (see the header of this script)" >&2; exit 2 ;;
  esac
done
if [ ${#stages[@]} -eq 0 ]; then
  case "$preset" in
    medium) stages=(mnist-lr compare) ;;
    *) stages=(logreg mnist-mlp mnist-cnn compare) ;;
  esac
fi
for stage in "${stages[@]}"; do
  [ -f "configs/$stage-$preset.toml" ] || {
    echo "reproduce.sh: stage '$stage' has no $preset preset (configs/$stage-$preset.toml)" >&2
    exit 2
  }
done

# One torch thread unless the caller says otherwise: the quick models are small, and two threads on a
# machine that is also busy with other work spin at every barrier (on a shared machine, the compare
# stage's attacks on one MNIST CNN took 505 s with two threads, 25 s with one, with the same results)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

bash scripts/setup.sh
. .venv/bin/activate
mkdir -p results

run_stage() {
  local config="configs/$1-$preset.toml" out="results/$1-$preset"
  echo "== $out: $config ($(date +%H:%M:%S))"
  marginlab run "$config" --out "$out" --continue  # runs it, resumes it, or keeps it if it finished
  runs+=("$out")
}

runs=()
for stage in "${stages[@]}"; do
  run_stage "$stage"
done
marginlab report "${runs[@]}" --out results/report --title "marginlab: minimum vs average margin ($preset presets)"
echo "done: open results/report/report.html"
