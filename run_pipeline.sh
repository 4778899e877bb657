#!/usr/bin/env bash
# Run every stage of paintsim in order (the explorer web site last); each stage skips work already done.
#
#   bash run_pipeline.sh --sample       # offline, on the embedded sample (data/sample), MobileNetV2
#   bash run_pipeline.sh                # the real NGA collection over HTTP, ResNet50
#   bash run_pipeline.sh --images DIR --metadata CSV   # your own collection (docs/collections.md)
#   bash run_pipeline.sh --urls CSV                    # your own collection, images over HTTP
#
# Options:
#   --sample      use the 79 embedded NGA thumbnails (no network) and mobilenet_v2
#   --images DIR  your own images; with --metadata CSV (titles, artists, ...; --id-column COL names
#                 the column holding each file's name) they are copied into DATA_DIR/images with a
#                 manifest; without, they are embedded where they are (file names as captions)
#   --urls CSV    your own images as URLs or IIIF bases (--url-column COL, --id-column COL)
#   --no-matrix   skip stages 4-5 (the full N x N matrix: ~30 GB in float16 for all of NGA);
#                 the neighbour table then comes from the streaming stage 6 alone
#   --force       rerun stages 4-8 even when their outputs are newer than their inputs
#   --faces       also find and embed the faces (extract_faces.py); the explorer shows them
# Environment:
#   PYTHON (default python3), DATA_DIR (default data), DEVICE (auto), BACKBONE (mobilenet_v2 with
#   --sample, else resnet50), LIMIT (only the first N >= 11 paintings: download_images.py --limit),
#   NO_PROGRESS=1 (hide progress bars), QUERY (the painting shown by stage 7, default row 0).
#
# Stages 1-3 resume and skip by themselves (valid images are not fetched again, embedded images are
# not embedded again). Stages 4-6 and 8 are skipped when their output is newer than their inputs.
set -euo pipefail
HERE=$PWD
cd "$(dirname "$0")"

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
abspath() { if [[ $1 == /* ]]; then echo "$1"; else echo "$HERE/$1"; fi; }  # paths as the user typed them

PY=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-data}
DEVICE=${DEVICE:-auto}
MODE=full
MATRIX=1
FORCE=0
FACES=0
IMAGES=""
METADATA=""
URLS=""
OWN_ARGS=()
need() { [[ -n "${2:-}" && "${2:0:2}" != "--" ]] || { echo "run_pipeline.sh: $1 needs a value" >&2; exit 2; }; }
while (( $# )); do
  case "$1" in
    --sample) MODE=sample ;;
    --no-matrix) MATRIX=0 ;;
    --force) FORCE=1 ;;
    --faces) FACES=1 ;;
    --images) need "$1" "${2:-}"; IMAGES=$(abspath "$2"); MODE=own; shift ;;
    --metadata) need "$1" "${2:-}"; METADATA=$(abspath "$2"); shift ;;
    --urls) need "$1" "${2:-}"; URLS=$(abspath "$2"); MODE=own; shift ;;
    --id-column|--url-column|--title-column|--artist-column|--date-column|--medium-column)
      need "$1" "${2:-}"; OWN_ARGS+=("$1" "$2"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_pipeline.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -n "$METADATA" && -z "$IMAGES" ]]; then
  echo "run_pipeline.sh: --metadata describes the images of --images DIR" >&2; exit 2
fi
if [[ -n "$URLS" && -n "$IMAGES" ]]; then
  echo "run_pipeline.sh: --urls and --images are two different collections: pick one" >&2; exit 2
fi

COMMON=(--data-dir "$DATA_DIR")
[[ -n "${NO_PROGRESS:-}" ]] && COMMON+=(--no-progress)
LIMIT_ARGS=()
if [[ -n "${LIMIT:-}" ]]; then
  [[ "$LIMIT" =~ ^[0-9]+$ ]] || { echo "run_pipeline.sh: LIMIT must be a whole number, got '$LIMIT'" >&2; exit 2; }
  (( LIMIT >= 11 )) || { echo "run_pipeline.sh: LIMIT must be at least 11 (the stages find 10 neighbours per painting)" >&2; exit 2; }
  LIMIT_ARGS=(--limit "$LIMIT")
fi

stage() { echo; echo "=== $1 ==="; shift; "$PY" "$@"; }
skip() { echo; echo "=== $1 === up to date, skipped (--force reruns it)"; }

# up_to_date OUTPUT INPUT...: OUTPUT exists and no INPUT is newer than it.
up_to_date() {
  local out=$1; shift
  [[ $FORCE == 1 || ! -e "$out" ]] && return 1
  local src
  for src in "$@"; do
    [[ -e "$src" && "$src" -nt "$out" ]] && return 1
  done
  return 0
}

SOURCE_ARGS=()   # where stages 2-3 find the images: the manifest, or a folder without one
if [[ $MODE == sample ]]; then
  stage "1/9 download (from data/sample, offline)" download_images.py "${COMMON[@]}" "${LIMIT_ARGS[@]}" \
      --csv-dir data/sample --images-from data/sample/images
  BACKBONE=${BACKBONE:-mobilenet_v2}
elif [[ -n "$URLS" ]]; then
  stage "1/9 download (your URLs)" download_images.py "${COMMON[@]}" "${LIMIT_ARGS[@]}" --urls "$URLS" \
      "${OWN_ARGS[@]}"
  BACKBONE=${BACKBONE:-resnet50}
elif [[ -n "$METADATA" ]]; then
  stage "1/9 collect (your images and metadata)" download_images.py "${COMMON[@]}" "${LIMIT_ARGS[@]}" \
      --images-from "$IMAGES" --metadata "$METADATA" "${OWN_ARGS[@]}"
  BACKBONE=${BACKBONE:-resnet50}
elif [[ -n "$IMAGES" ]]; then
  echo; echo "=== 1/9 download === skipped: the images of $IMAGES are embedded where they are (no --metadata)"
  SOURCE_ARGS=(--images-dir "$IMAGES")
  BACKBONE=${BACKBONE:-resnet50}
else
  stage "1/9 download (NGA IIIF)" download_images.py "${COMMON[@]}" "${LIMIT_ARGS[@]}"
  BACKBONE=${BACKBONE:-resnet50}
fi
stage "2/9 inspect" inspect_images.py "${COMMON[@]}" "${SOURCE_ARGS[@]}"
stage "3/9 features ($BACKBONE)" extract_features.py "${COMMON[@]}" "${SOURCE_ARGS[@]}" --backbone "$BACKBONE" \
    --device "$DEVICE"
if [[ $FACES == 1 ]]; then
  stage "3b/9 faces (MTCNN)" extract_faces.py "${COMMON[@]}" "${SOURCE_ARGS[@]}" --device "$DEVICE"
fi

F="$DATA_DIR/features.npy"
H5="$DATA_DIR/similarity_scores.h5"
TOP="$DATA_DIR/top_10_similar.npy"
TOP_MATRIX="$DATA_DIR/top_10_from_matrix.npy"
COMPARE=()
if [[ $MATRIX == 1 ]]; then
  if up_to_date "$H5" "$F"; then skip "4/9 full matrix"; else
    stage "4/9 full matrix" compute_similarity.py "${COMMON[@]}" --device "$DEVICE"; fi
  if up_to_date "$TOP_MATRIX" "$H5"; then skip "5/9 top-10 from the matrix"; else
    stage "5/9 top-10 from the matrix" extract_top_10.py "${COMMON[@]}"; fi
  COMPARE=(--compare-with "$TOP_MATRIX")   # the two routes must give the same neighbours
else
  echo; echo "=== 4/9, 5/9 full matrix === skipped (--no-matrix)"
fi
if up_to_date "$TOP" "$F"; then skip "6/9 top-10 streamed"; else
  stage "6/9 top-10 streamed" optimized_similarity.py "${COMMON[@]}" --device "$DEVICE" "${COMPARE[@]}"; fi

stage "7/9 display" display_similar.py "${COMMON[@]}" --query "${QUERY:-0}" --device "$DEVICE"
EVAL="$DATA_DIR/evaluation.json"
if up_to_date "$EVAL" "$F" "$TOP"; then
  skip "8/9 evaluate"
  "$PY" evaluate_unsupervised.py "${COMMON[@]}" --print-report
else
  stage "8/9 evaluate" evaluate_unsupervised.py "${COMMON[@]}" --device "$DEVICE"
fi

stage "9/9 explorer" explore_collection.py "${COMMON[@]}" --device "$DEVICE"

echo
echo "done: artifacts in $DATA_DIR/"
echo "  figures: $DATA_DIR/figures/ (neighbours: similar_*.png, evaluation: eval_*.png, contact sheet)"
echo "  report:  $EVAL"
echo "  explorer: open $DATA_DIR/site/index.html in a browser (no server needed)"
