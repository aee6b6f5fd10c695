#!/usr/bin/env bash
# `make demo`: the whole tool offline on a CPU in minutes: synthetic data -> train -> index -> search -> evaluate
# (recall and hard negatives, dual encoder vs fusion re-rank) -> HTML gallery and attention heat map.
set -euo pipefail
cd "$(dirname "$0")/.."
MM=.venv/bin/mmcross
OUT=${DEMO_OUT:-demo-out}
rm -rf "$OUT"

echo "== 1/6 synthetic shapes (\"red circle\" held out of training)"
$MM data synth "$OUT/synth" --n-images 4000 --seed 0 --image-size 48 --holdout "red circle"

echo "== 2/6 train the tiny preset (ITC + ITM with in-batch and swapped-caption hard negatives)"
$MM train --config configs/demo-synth.yaml --out "$OUT/run" --set train.data="$OUT/synth" --no-progress > "$OUT/train.json"

echo "== 3/6 index the test split"
$MM index "$OUT/synth" --split test --checkpoint "$OUT/run" --out "$OUT/index"

echo "== 4/6 search"
for query in "a red circle left of a blue square" "a green triangle above a yellow circle" "a blue square bigger than a yellow circle"; do
  $MM search "$OUT/index" --text "$query" --k 3 --rerank 20
done
$MM search "$OUT/index" --text "a red circle left of a blue square" --k 8 --rerank 50 --html "$OUT/search.html" > /dev/null

echo "== 5/6 evaluate on test: recall@K (dual encoder vs fusion re-rank) and hard negatives"
$MM eval "$OUT/synth" --split test --checkpoint "$OUT/run" --rerank 16 --hard-negatives \
  --out "$OUT/eval.json" --html "$OUT/failures.html" > /dev/null
.venv/bin/python - "$OUT/eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
d, f, h = r["metrics"], r["rerank_metrics"], r["hard_negatives"]
print(f"test split: {r['images']} images, {r['captions']} captions")
print(f"{'':34}{'dual encoder':>14}{'fusion re-rank':>16}")
for key in ("image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1", "rsum"):
    print(f"{key:34}{d[key]:>14.3f}{f[key]:>16.3f}")
print(f"{'caption over its swapped negative (chance 0.5)':48}{'dual (itc)':>12}{'fusion (itm)':>14}{'score':>8}")
rows = [("all pairs", h["pairs"], "", h)]
rows += [(f"  {kind}", v["pairs"], "", v) for kind, v in h.get("by_kind", {}).items()]
if h.get("heldout_pairs"):
    rows.append(("held-out 'red circle'", h["heldout_pairs"], "heldout_", h))
    rows += [(f"  {kind}", v["pairs"], "", v) for kind, v in h.get("heldout_by_kind", {}).items()]
for name, pairs, prefix, src in rows:
    get = (lambda k: src[f"{prefix}hard_negative_accuracy_{k}"]) if src is h else (lambda k: src[k])
    print(f"  {name:34}{pairs:>6} pairs{get('itc'):>12.3f}{get('itm'):>14.3f}{get('score'):>8.3f}")
PY

echo "== 6/6 attention heat map"
read -r image caption < <(.venv/bin/python -c "
import json
for line in open('$OUT/synth/manifest.jsonl'):
    row = json.loads(line)
    if row['split'] == 'test' and ' of ' in ' '.join(row['captions']):
        caption = next(c for c in row['captions'] if ' of ' in c)
        print('$OUT/synth/' + row['image'], caption)
        break
")
$MM explain "$image" "$caption" --checkpoint "$OUT/run" --out "$OUT/heat.png"

cat <<DONE

Demo finished. Look at:
  $OUT/search.html     search gallery (open in a browser)
  $OUT/failures.html   the worst test queries and what ranked above their true match
  $OUT/heat.png        what each word of "$caption" attends to
  $OUT/eval.json       all figures (and eval.png, the recall@K curve)
  $OUT/run/            the checkpoint (best.safetensors, last.safetensors), log.jsonl and loss.png
DONE
