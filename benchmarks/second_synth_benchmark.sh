#!/bin/bash
# The second synthesized benchmark (issue 15, docs/demo_data.md): a different generator setting
# than the demo's, judged through exactly the user commands with configs/small.yaml.
# Usage: bash benchmarks/second_synth_benchmark.sh OUT_DIR [TRAIN_OVERRIDE...]
#   (figures, every look: docs/demo_data.md, section 6; overrides go to every train.py run, e.g.
#   schedule.stage_epochs=432; the synthesized and prepared data are reused when OUT_DIR has them)
set -e
B=$(realpath -m "${1:?usage: second_synth_benchmark.sh OUT_DIR [TRAIN_OVERRIDE...]}")
shift
cd "$(dirname "$0")/.."
date
if [ ! -f $B/prepared/test/summary.json ]; then
  tricoclr-data synth --out $B/synth --classes 8 --videos-per-class 24 --seconds 5 --seed 5 --scenes 3 --train-fraction 0.5 --workers 2
  for split in train test; do
    tricoclr-data prepare $B/synth/videos --out $B/prepared/$split --format lmdb --list $B/synth/splits/${split}list01.txt --flow farneback --size 64 --workers 2
  done
fi
date
tricoclr eval retrieval --encoder random --config configs/small.yaml --train $B/prepared/train --test $B/prepared/test --json $B/eval_random.json --workers 2
for mods in "rgb,flow,audio" "rgb" "rgb,flow"; do
  name=$(echo $mods | tr , _)
  python tricoclr/train.py --config configs/small.yaml data.path=$B/prepared/train output_dir=$B/runs/$name "modalities=[$mods]" "$@" > $B/train_$name.log 2>&1
  tricoclr eval retrieval --encoder $B/runs/$name/encoders/rgb.safetensors --train $B/prepared/train --test $B/prepared/test --json $B/eval_$name.json --workers 2
  date
done
date
