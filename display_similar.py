#!/usr/bin/env python3
"""Stage 7: show a painting beside its most similar paintings (a PNG under <data-dir>/figures/).

The query is a painting of the collection (--query: a row index, an image file name, any id of the
manifest - key, uuid, NGA objectid, or an id column of your own such as item_id - or a part of a
title; prefix row:, file:, title: or <column>: to be explicit), a seeded random painting (--random
--seed S), or an image from outside the collection (--image PATH_OR_URL), which is embedded with
the backbone, weights and preprocessing recorded in features_meta.json. --all lists every
painting's neighbours in one CSV (<data-dir>/neighbours.csv) instead, for a spreadsheet.
Neighbours come from the neighbour table the one lookup finds (top_<k>_similar.npy first, see
docs/stages.md), else from an exact search of features.npy; the figure names which. Each
neighbour is captioned with title, artist, date and score (read against the collection's
random-pair level, in the heading), and listed in a CSV beside the PNG (cells a spreadsheet would
run as formulas are prefixed with ').
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from paintsim.cli import add_device_arg, add_k_arg, int_range, make_parser, output_file, run_main

log = logging.getLogger("paintsim.display")


def build_parser():
    p = make_parser(__doc__.split("\n\n")[0], prog="display_similar.py")
    p.description = __doc__
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--query", help="a painting of the collection: row index, image file name, an id "
                                   "(key, uuid, objectid, an id column of your own) or part of a title "
                                   "(or row:/file:/title:/<column>: followed by one)")
    q.add_argument("--random", action="store_true", help="a random painting of the collection (see --seed)")
    q.add_argument("--image", metavar="PATH_OR_URL",
                   help="an image from outside the collection: a local file or an http(s) URL")
    q.add_argument("--all", action="store_true",
                   help="every painting: write its neighbours, with titles and artists, to one CSV "
                        "(default <data-dir>/neighbours.csv)")
    p.add_argument("--faces", action="store_true",
                   help="--query/--random: show the painting's face (--face) beside its nearest faces in "
                        "other paintings (run extract_faces.py first)")
    p.add_argument("--face", type=int_range(0), default=0, help="--faces: which face of the painting (0: the first)")
    p.add_argument("--figures", action="store_true",
                   help="--all only: also draw one figure per painting under <data-dir>/figures/")
    p.add_argument("--seed", type=int_range(0), default=0, help="random seed for --random")
    add_k_arg(p, default=10)
    add_device_arg(p)
    p.add_argument("--weights", default=None,
                   help="--image only: local state dict to load instead of the weights named in "
                        "features_meta.json (for machines without the torchvision cache)")
    p.add_argument("--columns", type=int_range(1, 50), default=6, help="paintings per row of the figure")
    p.add_argument("--thumb-size", type=int_range(16, 1024), default=200, help="pixels per painting in the figure")
    p.add_argument("--output", type=output_file, default=None,
                   help="PNG to write (default: <data-dir>/figures/similar_<query>.png); the neighbours are "
                        "also listed in a CSV of the same name. With --all: the CSV to write")
    p.add_argument("--show", action="store_true", help="also open the figure in a window")
    return p


def caption(info: dict, score: float | None = None, prefix: str = "") -> str:
    title = info.get("title") or info.get("name", "")
    parts = [f"{prefix}{title}", info.get("attribution") or "unknown artist"]
    if info.get("displaydate"):
        parts.append(info["displaydate"])
    if score is not None:
        parts.append(f"score {score:.3f}")
    return "\n".join(parts)


def level_line(level: dict) -> str:
    return (f"score = cosine similarity; random pairs of this collection score {level['mean']:.2f} on "
            f"average (95% below {level['p95']:.2f})")


def show_row(coll, row: int, args, level: dict, out: Path | None = None, quiet: bool = False,
             found=None) -> Path:
    """One collection painting beside its neighbours (``found``: its rows, scores and their
    origin when already known): the PNG and its CSV."""
    from paintsim import query
    from paintsim.images import ImageDecodeError, load_rgb

    rows, scores, where = found or query.neighbors_of_row(coll, row, args.k, device=args.device)
    info = coll.info(row)
    try:
        query_img = load_rgb(coll.image_path(row))
    except ImageDecodeError as exc:
        log.warning("query image unreadable: %s", exc)
        query_img = None
    tag = f"row{row}_{query.safe_tag(Path(info['name']).stem)}"
    return draw(coll, rows, scores, where, query_img, caption(info, prefix="QUERY: "),
                query.describe(info), tag, args, level, out, quiet)


def draw(coll, rows, scores, where, query_img, query_cap, source, tag, args, level, out, quiet) -> Path:
    from paintsim import figures
    from paintsim.artifacts import write_csv_for_people

    images, caps = [], []
    for r, s in zip(rows, scores):
        images.append(coll.image_path(int(r)))
        caps.append(caption(coll.info(int(r)), float(s)))
    out = Path(out) if out else coll.paths.figures_dir / f"similar_{tag}.png"
    title = f"{len(rows)} nearest paintings to {source}\nneighbours from {where}\n{level_line(level)}"
    figures.neighbor_grid(query_img, query_cap, images, caps, out, columns=args.columns,
                          thumb_size=args.thumb_size, title=title, show=args.show)
    table = out.with_suffix(".csv")
    columns = ["rank", "score", "row", "key", "title", "attribution", "displaydate", "objectid", "uuid", "name"]
    listed = [{**coll.info(int(r)), "rank": rank, "score": round(float(s), 4), "row": int(r)}
              for rank, (r, s) in enumerate(zip(rows, scores), 1)]
    write_csv_for_people(table, columns, ([i[c] for c in columns] for i in listed))
    if not quiet:
        print(f"query: {source}")
        for i in listed:
            print(f"  {i['rank']:2d}. {i['score']:.3f}  {i['title'] or i['name']} - {i['attribution'] or '?'}"
                  f"{' (' + i['displaydate'] + ')' if i['displaydate'] else ''}  [row {i['row']}, {i['key']}]")
        print(f"{level_line(level)}\nneighbours from {where}; figure: {out}; list: {table}")
    return out


def main(args) -> int:
    from tqdm.auto import tqdm

    from paintsim import query

    if args.figures and not args.all:
        log.error("--figures goes with --all (one figure per painting)")
        return 2
    coll = query.Collection.open(args.data_dir)
    level = query.random_pair_level(coll, seed=args.seed)
    if args.all:
        index, score, where = query.all_neighbours(coll, args.k, device=args.device, progress=not args.no_progress)
        out = Path(args.output) if args.output else coll.paths.root / "neighbours.csv"
        n = query.write_neighbours_csv(coll, index, score, out)
        print(f"{n:,} neighbours of {len(coll):,} paintings (k = {index.shape[1]}) from {where}: {out}")
        print(level_line(level))
        if args.figures:
            for row in tqdm(range(len(coll)), desc="figures", unit="painting", disable=args.no_progress):
                show_row(coll, row, args, level, quiet=True, found=(index[row], score[row], where))
            print(f"figures: {coll.paths.figures_dir}/similar_row*.png")
        return 0
    if args.image:
        img = query.load_outside_image(args.image)
        vec = query.embed_outside_image(coll, img, device=args.device, weights=args.weights)
        rows, scores = query.search_outside(coll, vec, args.k, device=args.device)
        stem = args.image.rstrip("/").rsplit("/", 1)[-1]
        if scores.size and scores[0] > 0.995:
            log.info("the outside image is (almost) identical to row %d (%s) of the collection",
                     rows[0], coll.names[rows[0]])
        draw(coll, rows, scores, f"an exact search of {coll.paths.features.name}", img,
             f"QUERY (outside image)\n{query.safe_tag(stem, 40)}", f"the outside image {args.image}",
             "image_" + query.safe_tag(Path(stem).stem or "url"), args, level, args.output, False)
        return 0
    row = query.random_query(coll, args.seed) if args.random else query.resolve_query(args.query, coll)
    if args.faces:
        return show_faces(coll, row, args)
    show_row(coll, row, args, level, args.output)
    return 0


def show_faces(coll, row: int, args) -> int:
    """A painting's face beside the nearest faces of other paintings, each captioned with its
    painting's title and artist: the PNG and its CSV."""
    from paintsim import figures, query
    from paintsim.artifacts import write_csv_for_people
    from paintsim.embeddings import Embeddings
    from paintsim.errors import UserError
    from paintsim.faces import crop_face, faces_csv, read_faces_csv
    from paintsim.images import ImageDecodeError, load_rgb

    if args.image or args.all:
        raise UserError("--faces goes with --query or --random")
    faces = Embeddings.load(args.data_dir, kind="faces")
    boxes = read_faces_csv(faces_csv(faces.paths))
    name = str(coll.names[row])
    info = coll.info(row)
    found = boxes.get(name, [])
    if not found:
        raise UserError(f"no face was found in {query.describe(info)} (row {row}); paintings with faces are "
                        f"listed in {faces_csv(faces.paths)}")
    if args.face >= len(found):
        raise UserError(f"--face {args.face}: {query.describe(info)} has {len(found)} face(s), 0..{len(found) - 1}")
    hits = np.flatnonzero(faces.names == f"{name}#{args.face}")
    if not hits.size:
        raise UserError(f"{faces.paths.image_names} has no face {name}#{args.face} although "
                        f"{faces_csv(faces.paths)} lists it: rerun extract_faces.py")
    face_row = int(hits[0])
    crop_meta = faces.meta.get("crop", {}) if faces.meta else {}
    rows, scores, where = query.face_neighbours(coll, faces, face_row, args.k, device=args.device)

    def crop(face_name: str):
        image, i = face_name.rsplit("#", 1)
        image = Path(image).name  # looked up in the folder, never a path
        try:
            face = crop_face(load_rgb(coll.emb.images_dir / image), boxes[image][int(i)],
                             crop_meta.get("margin", 0.3), crop_meta.get("align", True))
            return face.resize((args.thumb_size, args.thumb_size))  # small faces drawn at the tile's size
        except (ImageDecodeError, KeyError, IndexError, ValueError) as exc:
            log.warning("face %s unreadable: %s", face_name, exc)
            return None

    images, caps, listed = [], [], []
    for rank, (r, s) in enumerate(zip(rows, scores), 1):
        fname = str(faces.names[int(r)])
        prow = query.painting_row_of(coll, fname.rsplit("#", 1)[0])
        pinfo = coll.info(prow) if prow is not None else {"title": fname, "attribution": "", "displaydate": "",
                                                          "key": "", "name": fname}
        images.append(crop(fname))
        caps.append(caption(pinfo, float(s)))
        listed.append({"rank": rank, "score": round(float(s), 4), "face": fname, "row": prow, "key": pinfo["key"],
                       "title": pinfo["title"], "attribution": pinfo["attribution"]})
    tag = f"face_row{row}_{args.face}_{query.safe_tag(Path(name).stem)}"
    out = Path(args.output) if args.output else coll.paths.figures_dir / f"similar_{tag}.png"
    title = (f"{len(rows)} nearest faces in other paintings to face {args.face} of {query.describe(info)}\n"
             f"neighbours from {where}; score = cosine similarity of the face crops' embeddings")
    figures.neighbor_grid(crop(f"{name}#{args.face}"), caption(info, prefix="QUERY FACE: "), images, caps, out,
                          columns=args.columns, thumb_size=args.thumb_size, title=title, show=args.show)
    columns = ["rank", "score", "face", "row", "key", "title", "attribution"]
    write_csv_for_people(out.with_suffix(".csv"), columns, ([i[c] for c in columns] for i in listed))
    print(f"query: face {args.face} of {query.describe(info)}")
    for i in listed:
        print(f"  {i['rank']:2d}. {i['score']:.3f}  {i['title']} - {i['attribution'] or '?'}  [{i['face']}]")
    print(f"neighbours from {where}; figure: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
