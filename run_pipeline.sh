#!/usr/bin/env bash
# Run every stage of paintsim in order; each stage skips work already done.
#   bash run_pipeline.sh --sample   # offline, on the embedded sample (data/sample), MobileNetV2
#   bash run_pipeline.sh            # the real NGA collection over HTTP, ResNet50
# Environment: PYTHON (default python3), DATA_DIR (default data).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-data}
MODE=full
[[ "${1:-}" == "--sample" ]] && MODE=sample

stage() { echo; echo "=== $1 ==="; shift; "$PY" "$@"; }

if [[ $MODE == sample ]]; then
  stage "1/8 download (from data/sample, offline)" download_images.py --data-dir "$DATA_DIR" \
      --csv-dir data/sample --images-from data/sample/images
  BACKBONE=mobilenet_v2
else
  stage "1/8 download (NGA IIIF)" download_images.py --data-dir "$DATA_DIR"
  BACKBONE=resnet50
fi
[[ -f inspect_images.py ]] && stage "2/8 inspect" inspect_images.py --data-dir "$DATA_DIR"
[[ -f extract_features.py ]] && stage "3/8 features" extract_features.py --data-dir "$DATA_DIR" --backbone "$BACKBONE"
[[ -f compute_similarity.py ]] && stage "4/8 full matrix" compute_similarity.py --data-dir "$DATA_DIR"
[[ -f extract_top_10.py ]] && stage "5/8 top-10 from the matrix" extract_top_10.py --data-dir "$DATA_DIR"
[[ -f optimized_similarity.py ]] && stage "6/8 top-10 streamed" optimized_similarity.py --data-dir "$DATA_DIR"
[[ -f display_similar.py ]] && stage "7/8 display" display_similar.py --data-dir "$DATA_DIR" --query 0
[[ -f evaluate_unsupervised.py ]] && stage "8/8 evaluate" evaluate_unsupervised.py --data-dir "$DATA_DIR"
echo; echo "done: artifacts in $DATA_DIR/"
