#!/usr/bin/env bash
# The cost benchmark (COSTS.md): synthetic months of an analytics team (40 users, weekday
# peaks at 9:00 and 13:45, a lunch dip, quiet nights and weekends; `rstudio-pool trace
# synthetic`), each replayed by `rstudio-pool simulate` through the pool of
# benches/costs/ec2.yaml (RStudio on t3.large, culled after an idle hour) once per warm
# policy. The first three weeks warm the pool up and teach `forecast`; the fourth is measured.
# Then the same month with pausing (benches/costs/ec2-pause.yaml) for what stored volumes cost.
#
#   benches/costs.sh              # seeds 1 2 3, about 6 minutes on 2 cores
#   SEEDS=1 benches/costs.sh      # one month
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1 2 3"}
USERS=${USERS:-40}
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet
BIN=$TARGET/release/rstudio-pool
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

SCHEDULE='{kind: schedule, ranges: [{when: "mon-fri 07:00-19:00", min_free: 2}], otherwise: 0}'
for seed in $SEEDS; do
  "$BIN" trace synthetic --users "$USERS" --days 28 --seed "$seed" > "$OUT/month-$seed.jsonl"
  echo "## trace seed $seed: culled after an idle hour (benches/costs/ec2.yaml)"
  "$BIN" -c benches/costs/ec2.yaml simulate --trace "$OUT/month-$seed.jsonl" --skip-days 21 \
    --policy fixed:0 --policy fixed:1 --policy fixed:2 --policy fixed:3 \
    --policy "$SCHEDULE" \
    --policy '{kind: forecast, miss_probability: 0.05}' \
    --policy '{kind: forecast}' \
    --policy '{kind: forecast, miss_probability: 0.01}'
  echo
  echo "## trace seed $seed: paused after an idle hour, kept 14 days (benches/costs/ec2-pause.yaml)"
  "$BIN" -c benches/costs/ec2-pause.yaml simulate --trace "$OUT/month-$seed.jsonl" --skip-days 21 \
    --policy fixed:2 --policy '{kind: forecast}'
  echo
done
