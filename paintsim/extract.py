"""Stage 3: one L2-normalised embedding per painting, resumably.

Items come from the manifest (status ok) or a folder; each is decoded (bounded) and preprocessed in
DataLoader workers (:mod:`paintsim.items`) and embedded by :class:`~paintsim.embedder.Embedder`.
Finished work is kept in chunk files under ``features_progress/`` (:mod:`paintsim.embed_loop`), so a
killed run resumes and gives the same arrays as an uninterrupted one, and a rerun after new
downloads only embeds the new images. The outputs are written by
:func:`paintsim.embeddings.write_embeddings`.

:func:`~paintsim.embed_loop.embed_items` is the one embedding loop. A single backbone uses it
once, with ``features_progress/`` itself as its store; a fusion (several backbones, or ``pca``;
:mod:`paintsim.fusion`) uses it once per model, each with its own store
``features_progress/models/<backbone>/``, then fuses the rows. ``output_dir`` puts the
outputs and the progress in another folder than the data dir whose manifest and images are read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import artifacts
from .artifacts import DataPaths
from .backbones import DEFAULT_BACKBONE
from .devices import auto_workers, configure_threads, resolve_device
from .embed_loop import DEFAULT_CHUNK_SIZE, EmbedResult, collect_rows, embed_items
from .embedder import META_VERSION, Embedder
from .embeddings import Embeddings, write_embeddings
from .errors import BadValue, UserError
from .items import Item, items_from_dir, items_from_manifest

log = logging.getLogger(__name__)

#: Auto batch sizes: on the CPU small batches keep activations in cache (measured fastest at 4-8,
#: see docs/performance.md); a GPU wants large ones.
CPU_BATCH_SIZE = 8
CUDA_BATCH_SIZE = 64


# --------------------------------------------------------------------------------------------
# the stage


@dataclass
class ExtractConfig:
    data_dir: str = "data"
    images_dir: str | None = None
    backbone: str = DEFAULT_BACKBONE      # one name, or a comma list of names to fuse
    weights: str | None = "default"       # weights source: one for all, or a comma list (fusion)
    no_crop: bool = False
    batch_size: int = 0             # 0: auto (CPU_BATCH_SIZE / CUDA_BATCH_SIZE)
    workers: int = -1               # -1: auto (auto_workers: 0 or 1 on the CPU, min(8, cores) on CUDA)
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    threads: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    seed: int = 0
    progress: bool = True
    crop: str = "none"              # none | faces (the box around the faces of faces.csv)
    fusion_weights: str | None = "1"    # blend weights of the fused models (one for all, or a comma list)
    pca: int = 0                    # fused rows projected onto this many principal components (0: none)
    whiten: bool = False            # divide each PCA component by its standard deviation
    output_dir: str | None = None   # where the outputs and progress go (default: data_dir)
    extra_meta: dict[str, Any] = field(default_factory=dict)


def _write_errors_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    artifacts.write_csv_for_people(path, ["file", "error"], rows)


def _outputs_current(paths: DataPaths, fingerprint: str, names: list[str]) -> bool:
    """The outputs on disk are this configuration's, for these images, and whole (checksums,
    the PCA file's included)."""
    if not paths.features_meta.exists():
        return False
    try:
        emb = Embeddings.load(paths.root, require_meta=True)
    except (OSError, UserError) as exc:
        log.info("rewriting the outputs: %s", exc)
        return False
    if emb.meta.get("fingerprint") != fingerprint or emb.names.tolist() != names:
        return False
    pca = (emb.meta.get("fusion") or {}).get("pca") if isinstance(emb.meta.get("fusion"), dict) else None
    if pca:
        from .fusion import file_sha256

        if not paths.features_pca.is_file() or file_sha256(paths.features_pca) != pca.get("sha256"):
            log.info("rewriting the outputs: %s is missing or changed", paths.features_pca)
            return False
    return True


@dataclass
class _Run:
    """What every extraction shares: where things are, the items, the device settings, the crop."""

    paths: DataPaths                # the data dir: manifest, images, faces.csv
    out: DataPaths                  # where the outputs and progress go (--output-dir)
    items: list[Item]
    source: str
    device: str
    threads: int
    batch_size: int
    workers: int
    faces: dict | None
    crop_meta: dict[str, Any]
    crop_digest: str | None

    def fingerprint(self, embedder_fingerprint: str) -> str:
        """The progress fingerprint of one model: its embedding's, plus the face crop when asked."""
        if self.crop_digest is None:
            return embedder_fingerprint
        return hashlib.sha256(f"{embedder_fingerprint}:faces:{self.crop_digest}".encode()).hexdigest()[:16]


def _prepare(cfg: ExtractConfig) -> _Run:
    if cfg.batch_size < 0:
        raise BadValue("batch_size", cfg.batch_size, "must be at least 1, or 0 for auto")
    if cfg.workers < -1:
        raise BadValue("workers", cfg.workers, "must be 0 or more, or -1 for auto")
    if cfg.chunk_size < 1:
        raise BadValue("chunk_size", cfg.chunk_size, "must be at least 1")
    if cfg.crop not in ("none", "faces"):
        raise BadValue("crop", cfg.crop, "must be none or faces")
    paths = DataPaths.of(cfg.data_dir)
    out = DataPaths.of(cfg.output_dir) if cfg.output_dir else paths
    items = items_from_dir(cfg.images_dir) if cfg.images_dir else items_from_manifest(paths)
    if cfg.images_dir:
        source = f"images-dir:{Path(cfg.images_dir).resolve()}"
    elif out.root.resolve() != paths.root.resolve():
        source = f"manifest:{paths.root.resolve()}"  # Embeddings.images_dir finds the images from here
    else:
        source = "manifest"
    if not items:
        raise UserError(f"nothing to extract: {'--images-dir ' + str(cfg.images_dir) if cfg.images_dir else str(paths.manifest)} "
                        "lists no images")
    device = resolve_device(cfg.device)
    threads = configure_threads(cfg.threads, device)
    batch_size = cfg.batch_size or (CUDA_BATCH_SIZE if device == "cuda" else CPU_BATCH_SIZE)
    workers = cfg.workers if cfg.workers >= 0 else auto_workers(device, threads)
    faces, crop_meta, digest = None, {"mode": "none"}, None
    if cfg.crop == "faces":
        from .faces import faces_csv, read_faces_csv

        fpath = faces_csv(paths)
        if not fpath.exists():
            raise UserError(f"--crop faces needs {fpath}: run extract_faces.py first")
        faces = read_faces_csv(fpath)
        digest = hashlib.sha256(fpath.read_bytes()).hexdigest()
        with_faces = sum(1 for it in items if faces.get(it.name))
        crop_meta = {"mode": "faces", "margin": 0.3, "faces_csv_sha256": digest, "images_with_faces": with_faces,
                     "whole_painting_fallbacks": len(items) - with_faces}
        log.info("--crop faces: %d of %d images cropped to their faces, the others embedded whole",
                 with_faces, len(items))
    return _Run(paths, out, items, source, device, threads, batch_size, workers, faces, crop_meta, digest)



def _recorded_fingerprints(store_dir: Path, meta_path: Path | None) -> list[tuple[str, str]]:
    """(fingerprint, where) of finished rows on disk: the progress store's (when it holds chunks),
    then the outputs' features_meta.json (when given)."""
    found: list[tuple[str, str]] = []
    try:
        if any(store_dir.glob("chunk-*.npz")):
            fp = artifacts.read_json_object(store_dir / "config.json").get("fingerprint")
            if isinstance(fp, str):
                found.append((fp, f"the progress in {store_dir}"))
    except (OSError, UserError):
        pass
    if meta_path is not None:
        try:
            fp = artifacts.read_json_object(meta_path).get("fingerprint")
            if isinstance(fp, str):
                found.append((fp, str(meta_path)))
        except (OSError, UserError):
            pass
    return found


def keep_recorded_precision(emb: Embedder, run: "_Run", store_dir: Path, meta_path: Path | None = None) -> None:
    """``--precision auto`` on the CPU answers by measurement, so it may say fp32 on one run and
    bf16 on another (another machine or thread count, a new gate table). Where rows made by this
    same configuration in the other precision are already on disk (a killed run's progress, or the
    outputs an incremental rerun extends), auto keeps their precision: a resumed run never mixes
    fp32 and bf16 rows (the fingerprint holds the precision, so it could not anyway) and does not
    silently throw finished work away either. ``--precision fp32|bf16`` re-embeds in the one named."""
    choice = emb.precision_choice or {}
    if choice.get("requested") != "auto" or run.device != "cpu":
        return
    current = run.fingerprint(emb.fingerprint())
    others = {run.fingerprint(emb.fingerprint(p)): p for p in ("fp32", "bf16") if p != emb.precision}
    for fp, where in _recorded_fingerprints(store_dir, meta_path):
        if fp == current:
            return
        if fp in others:
            kept = others[fp]
            log.warning("--precision auto: keeping %s, the precision of %s (this run alone would pick %s); "
                        "pass --precision %s to re-embed everything in %s", kept, where, emb.precision,
                        emb.precision, emb.precision)
            emb.precision_choice = {**choice, "resolved": kept, "would_pick": emb.precision,
                                    "reason": f"auto: kept {kept}, the precision of {where} (this run alone "
                                              f"would pick {emb.precision}: {choice.get('reason', '')})"}
            emb.precision = kept
            if kept != "bf16":
                emb._bf16_model = None     # the probe's bf16 copy is not needed
            return


def _run_meta(cfg: ExtractConfig, run: _Run, fingerprint: str, n_errors: int) -> dict[str, Any]:
    """What features_meta.json records about the run itself, beside the model's recipe."""
    return {"errors": n_errors, "source": run.source, "fingerprint": fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "meta_version": META_VERSION, "threads": run.threads, "workers": run.workers,
            "crop": run.crop_meta, **cfg.extra_meta}


def _remove_stale_pca(out: DataPaths) -> None:
    """A PCA file left by an earlier fused run describes no current features: remove it."""
    if out.kind == "paintings" and out.features_pca.exists():
        log.info("removing %s: the current features use no PCA", out.features_pca)
        out.features_pca.unlink()


def extract_features(cfg: ExtractConfig) -> dict[str, Any]:
    """Run the stage; return the summary (also logged). Several backbones (a comma list), or a PCA,
    make a fused extraction (:mod:`paintsim.fusion`); one backbone alone is the plain one."""
    from .fusion import parse_models

    models = parse_models(cfg.backbone, cfg.weights, cfg.fusion_weights)
    if cfg.pca < 0:
        raise BadValue("pca", cfg.pca, "must be 0 (no PCA) or a number of components")
    if cfg.whiten and not cfg.pca:
        raise BadValue("whiten", cfg.whiten, "whitening needs a PCA (pca = the number of components)")
    run = _prepare(cfg)
    if len(models) > 1 or cfg.pca:
        return _extract_fused(cfg, run, models)
    if models[0].letterbox is not None:
        cfg = dataclasses.replace(cfg, no_crop=models[0].letterbox)
    return _extract_single(cfg, run, models[0].backbone)


def _extract_single(cfg: ExtractConfig, run: _Run, backbone: str) -> dict[str, Any]:
    paths, items = run.out, run.items
    emb = Embedder.create(backbone, cfg.weights, cfg.no_crop, run.device, cfg.precision, cfg.channels_last,
                          cfg.seed, run.batch_size, progress=cfg.progress)
    keep_recorded_precision(emb, run, paths.features_progress_dir, paths.features_meta)
    log.info("precision: %s (%s)", emb.precision, (emb.precision_choice or {}).get("reason", ""))
    fingerprint = run.fingerprint(emb.fingerprint())
    res = embed_items(emb, items, paths.features_progress_dir, fingerprint, device=run.device,
                      batch_size=run.batch_size, workers=run.workers, chunk_size=cfg.chunk_size,
                      progress=cfg.progress, faces=run.faces, source=run.source, threads=run.threads)
    store = res.store
    names, rows, error_rows = collect_rows(store, items)
    if not rows:
        _write_errors_csv(paths.features_errors, error_rows)
        raise UserError(f"none of the {len(items)} image(s) could be read; see {paths.features_errors}")

    if res.todo or not _outputs_current(paths, fingerprint, names):
        meta = dict(emb.meta, **_run_meta(cfg, run, fingerprint, len(error_rows)))
        # the old outputs stay valid until the new ones are whole (checksums in the meta)
        write_embeddings(paths, np.stack(rows), names, meta)
        _write_errors_csv(paths.features_errors, error_rows)
        store.compact(items)
        up_to_date = False
    else:
        log.info("outputs are up to date: nothing to write")
        up_to_date = True
    _remove_stale_pca(paths)

    summary = {"images": len(items), "embedded": res.embedded, "reused": res.reused, "errors": len(error_rows),
               "rows": len(names), "dimension": emb.dim, "backbone": emb.spec.name, "weights": emb.weights.id,
               "preprocessing": emb.preprocessing.mode, "device": run.device, "seconds": round(res.seconds, 2),
               "images_per_s": round(res.todo / res.seconds, 1) if res.todo and res.seconds > 0 else None,
               "up_to_date": up_to_date, "features": str(paths.features)}
    return summary


def _extract_fused(cfg: ExtractConfig, run: _Run, models) -> dict[str, Any]:
    """Each model embedded with its own progress (``features_progress/models/<backbone>/``), then
    fused (:func:`paintsim.fusion.fuse`), through a PCA of the collection when asked."""
    import gc

    from . import fusion
    from .backbones import get_spec

    paths, items = run.out, run.items
    blends = [m.blend for m in models]
    in_dim = sum(get_spec(m.backbone).dim for m in models)
    if cfg.pca:  # before hours of embedding: the PCA cannot have more components than images or features
        fusion.check_pca_size(cfg.pca, len(items), in_dim)

    entries: list[dict[str, Any]] = []       # the recipe, one entry per model in --backbone order
    model_fps: list[str] = []                # each model's progress fingerprint, in --backbone order
    results: dict[str, EmbedResult] = {}     # fingerprint -> its pass (a model named twice runs once)
    labels: dict[str, str] = {}              # fingerprint -> the model's name in error messages
    dirs: dict[str, str] = {}                # progress folder name -> fingerprint
    first_meta: dict[str, Any] = {}
    per_model: list[dict[str, Any]] = []
    for m in models:
        letterbox = cfg.no_crop if m.letterbox is None else m.letterbox
        emb = Embedder.create(m.backbone, m.weights, letterbox, run.device, cfg.precision, cfg.channels_last,
                              cfg.seed, run.batch_size, progress=cfg.progress)
        keep_recorded_precision(emb, run, paths.features_progress_dir / "models" / m.backbone)
        log.info("%s precision: %s (%s)", m.backbone, emb.precision, (emb.precision_choice or {}).get("reason", ""))
        fp = run.fingerprint(emb.fingerprint())
        emeta = emb.meta
        first_meta = first_meta or emeta
        entries.append(fusion.model_entry(emeta, m.blend))
        model_fps.append(fp)
        if fp not in results:
            name = m.backbone if dirs.get(m.backbone, fp) == fp else f"{m.backbone}-{fp[:8]}"
            dirs[name] = fp
            labels[fp] = name
            res = embed_items(emb, items, paths.features_progress_dir / "models" / name, fp, device=run.device,
                              batch_size=run.batch_size, workers=run.workers, chunk_size=cfg.chunk_size,
                              progress=cfg.progress, faces=run.faces, source=f"{run.source} [{name}]",
                              threads=run.threads)
            results[fp] = res
            per_model.append({"backbone": m.backbone, "progress": name, "embedded": res.embedded,
                              "reused": res.reused, "seconds": round(res.seconds, 2)})
        del emb
        gc.collect()
        if run.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    # an image is a row of the fusion only when every model embedded it
    distinct = list(results)
    names: list[str] = []
    rows: dict[str, list[np.ndarray]] = {fp: [] for fp in distinct}
    error_rows: list[tuple[str, str]] = []
    for it in items:
        key = (it.name, it.size, it.mtime_ns)
        failed = [fp for fp in distinct if key not in results[fp].store.features]
        if failed:
            error_rows.append((it.file, "; ".join(
                f"[{labels[fp]}] {results[fp].store.errors.get(key, 'not processed')}" for fp in failed)))
            continue
        names.append(it.name)
        for fp in distinct:
            rows[fp].append(results[fp].store.features[key])
    if not names:
        _write_errors_csv(paths.features_errors, error_rows)
        raise UserError(f"none of the {len(items)} image(s) could be embedded by every model; see "
                        f"{paths.features_errors}")
    if cfg.pca:
        fusion.check_pca_size(cfg.pca, len(names), in_dim)

    fingerprint = fusion.recipe_fingerprint(model_fps, blends, cfg.pca, cfg.whiten)
    todo = sum(r.todo for r in results.values())
    if todo or not _outputs_current(paths, fingerprint, names):
        arrays = {fp: np.stack(rows[fp]) for fp in distinct}
        del rows
        parts = [arrays[fp] for fp in model_fps]
        n = len(names)
        step = fusion.block_rows(in_dim)

        def blocks():
            for s in range(0, n, step):
                yield fusion.weighted_concat([p[s:s + step] for p in parts], blends)

        pca, pca_info = None, None
        if cfg.pca:
            fitted, method = fusion.fit_pca(blocks, n, in_dim, cfg.pca, cfg.whiten)
            # written before the features, so the meta's checksum names it; projected through the file
            # as read back, exactly as an outside image will be
            sha = fusion.save_pca(paths.features_pca, fitted)
            pca = fusion.load_pca(paths.features_pca, sha256=sha)
            pca_info = fusion.pca_meta(pca, sha, method, n)
            log.info("PCA %d -> %d (%s%s): %.1f %% of the variance", in_dim, pca.n_components, method,
                     ", whitened" if pca.whiten else "", 100 * pca_info["explained_variance_ratio_total"])
        fused = np.concatenate([fusion.fuse([p[s:s + step] for p in parts], blends, pca)
                                for s in range(0, n, step)])
        bad = np.nonzero(~np.isfinite(fused).all(axis=1))[0]
        if len(bad):  # a row that the projection sends to zero has no direction
            drop = set(bad.tolist())
            by_name = {it.name: it for it in items}
            error_rows += [(by_name[names[i]].file, f"{by_name[names[i]].file}: the fused projection is zero "
                            "(no direction)") for i in sorted(drop)]
            keep = np.array([i not in drop for i in range(n)])
            fused, names = fused[keep], [nm for i, nm in enumerate(names) if i not in drop]
        dim = int(fused.shape[1])
        meta = dict(fusion.fused_meta(entries, first_meta, pca_info, dim),
                    **_run_meta(cfg, run, fingerprint, len(error_rows)))
        write_embeddings(paths, fused, names, meta)
        _write_errors_csv(paths.features_errors, error_rows)
        for fp in distinct:
            results[fp].store.compact(items)
        up_to_date = False
    else:
        log.info("outputs are up to date: nothing to write")
        current = Embeddings.load(paths.root)
        dim, pca_info = current.dim, current.meta["fusion"]["pca"]
        up_to_date = True
    if not cfg.pca:
        _remove_stale_pca(paths)

    seconds = sum(r.seconds for r in results.values())
    pca_out = None
    if cfg.pca:
        pca_out = {k: pca_info[k] for k in ("dimension", "whiten", "explained_variance_ratio_total", "method")}
    return {"images": len(items), "embedded": sum(r.embedded for r in results.values()),
            "reused": sum(r.reused for r in results.values()), "errors": len(error_rows), "rows": len(names),
            "dimension": dim, "backbone": "+".join(m.backbone for m in models),
            "weights": "+".join(e["weights"]["id"] for e in entries),
            "preprocessing": entries[0]["preprocessing"]["mode"], "device": run.device,
            "seconds": round(seconds, 2),
            "images_per_s": round(todo / seconds, 1) if todo and seconds > 0 else None,
            "up_to_date": up_to_date, "features": str(paths.features),
            "fusion": {"models": per_model, "blend_weights": blends, "input_dimension": in_dim, "pca": pca_out}}
