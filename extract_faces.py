#!/usr/bin/env python3
"""Faces: detect the faces in every painting (MTCNN) and embed each one, resumably.

Writes <data-dir>/faces.csv (image, face, box x0 y0 x1 y1 in the original image's pixels,
probability, the five landmarks), face_features.npy (one L2-normalised row per face),
face_names.npy (<image>#<face>) and face_meta.json; unreadable images are listed in
faces_errors.csv. Faces are cropped with --margin, turned so the eyes are level, and embedded by
the collection's backbone (features_meta.json: run extract_features.py first), or by the VGGFace2
face model (--face-model vggface2; its weights are downloaded once). Then
optimized_similarity.py --faces gives every face its nearest faces in other paintings.
"""
from __future__ import annotations

import sys

from paintsim.cli import add_device_arg, config_from_args, float_range, int_range, make_parser, run_main


def build_parser():
    p = make_parser(__doc__.split("\n\n")[0], prog="extract_faces.py", locked=True)
    p.description = __doc__
    p.add_argument("--images-dir", default=None, help="every file of this folder instead of the manifest's images")
    p.add_argument("--min-face-size", type=int_range(4, 10000), default=20,
                   help="smallest face looked for, in the original image's pixels")
    p.add_argument("--min-prob", type=float_range(0, 1), default=0.9, help="faces MTCNN is less sure of are dropped")
    p.add_argument("--max-size", type=int_range(32, 10000), default=1024,
                   help="images are scaled down to this longest edge before detection (caps the pyramid)")
    p.add_argument("--margin", type=float_range(0, 2), default=0.3, help="crop margin, a fraction of the face's size per side")
    p.add_argument("--no-align", action="store_true", help="do not turn crops so the eyes are level")
    p.add_argument("--face-model", choices=("backbone", "vggface2"), default="backbone",
                   help="what embeds a face: the collection's backbone, or InceptionResnetV1 (VGGFace2)")
    p.add_argument("--weights", default=None,
                   help="a local state dict for the embedding model instead of the recorded/cached one")
    add_device_arg(p)
    p.add_argument("--batch-size", type=int_range(1, 1024), default=16, help="images per detection batch")
    p.add_argument("--chunk-size", type=int_range(1), default=256, help="images per progress chunk")
    return p


def main(args) -> int:
    from paintsim.faces import FaceConfig, run_faces

    s = run_faces(config_from_args(FaceConfig, args))
    print(f"faces: {s['faces']} in {s['images_with_faces']} of {s['images']} images "
          f"({s['processed']} looked at now, {s['unreadable']} unreadable) in {s['seconds']:.1f} s -> {s['csv']}"
          + (f", {s['features']}" if s["features"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
