"""Which labels retrieval is judged against: placeholders, joins on any column or the file name,
and a retrieval the user asked for that cannot run (paintsim.evaluation, evaluate_unsupervised.py)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from helpers import run_script
from paintsim import evaluation
from paintsim.errors import UserError
from paintsim.manifest import read_manifest, write_manifest
from synthetic_collection import make_collection


@pytest.fixture()
def planted(tmp_path):
    return make_collection(tmp_path / "data")


def _cfg(**kw):
    base = dict(skip_copies=True, skip_pixels=True, progress=False, pairs=2000)
    base.update(kw)
    return evaluation.EvalConfig(**base)


def _set_manifest(planted, **columns):
    """Overwrite or add manifest columns (the manifest may carry a user's own metadata columns)."""
    path = planted["root"] / "manifest.csv"
    df = read_manifest(path)
    for col, values in columns.items():
        df[col] = list(values)
    write_manifest(path, df)


def _unknowns(planted):
    """Nine of the unrelated paintings get placeholder artists in three spellings."""
    artists = read_manifest(planted["root"] / "manifest.csv")["attribution"].tolist()
    rows = np.flatnonzero(planted["group_of"] == -1)[:9]
    for i, row in enumerate(rows):
        artists[row] = ("Unknown", " anonymous ", "Unknown   Artist")[i % 3]
    return artists


def test_placeholder_labels_are_left_out_and_counted(planted):
    root = str(planted["root"])
    honest = evaluation.evaluate(root, _cfg()).report["retrieval"]
    _set_manifest(planted, attribution=_unknowns(planted))
    ret = evaluation.evaluate(root, _cfg()).report["retrieval"]
    # the nine unrelated "Unknown"/"anonymous" paintings are not a group the neighbours should find
    assert ret["placeholder_excluded"] == 9
    assert ret["placeholder_values"] == {"Unknown": 3, "anonymous": 3, "Unknown   Artist": 3}
    for key in ("n_queries", "precision@1", "precision@5", "mAP@10"):
        assert ret[key] == honest[key]
    # counted as labels they would be queries whose neighbours are random: precision drops
    naive = evaluation.evaluate(root, _cfg(placeholder_labels="")).report["retrieval"]
    assert naive["placeholder_excluded"] == 0
    assert naive["n_queries"] == 20 + 3 + 3 + 3  # "Unknown   Artist" is its own exact label
    assert naive["precision@1"] < ret["precision@1"] == 1.0
    only = evaluation.evaluate(root, _cfg(placeholder_labels=" UNKNOWN ,")).report["retrieval"]
    assert only["placeholder_excluded"] == 3 and only["n_queries"] == 26
    table = evaluation.summary_table(evaluation.evaluate(root, _cfg()).report)
    row = next(line for line in table.splitlines() if "placeholder labels left out" in line)
    assert row.split()[-7:] == ["9", "(Unknown", "x3,", "Unknown", "Artist", "x3,", "anonymous"] or "9 (" in row
    assert "9 (" in row and "anonymous x3" in row and "Unknown x3" in row


def test_labels_csv_joined_on_another_column_and_any_manifest_column(planted, tmp_path):
    n = len(planted["names"])
    item_ids = [f"IT-{i:03d}" for i in range(n)][::-1]
    _set_manifest(planted, item_id=item_ids, museum=np.where(np.isin(planted["group_of"], [0, 1]), "Uffizi", ""))
    # an extra manifest column is a label like any other
    ret = evaluation.evaluate(str(planted["root"]), _cfg(label_column="museum")).report["retrieval"]
    assert ret["n_queries"] == 8 and ret["precision@1"] == 1.0 and ret["label_source"] == "manifest.csv:museum"
    # a CSV keyed by item_id: groups 0-2 share a school; a repeated key keeps its first row; a stray row
    school = np.where(np.isin(planted["group_of"], [0, 1, 2]), "Sienese", "")
    rows = pd.DataFrame({"item_id": item_ids, "school": school})
    rows = pd.concat([rows, rows.iloc[:2].assign(school="Venetian"),
                      pd.DataFrame({"item_id": ["IT-999"], "school": ["Dutch"]})])
    csv = tmp_path / "labels.csv"
    rows.to_csv(csv, index=False)  # the repeats come last: the first row of a key wins
    ret = evaluation.evaluate(str(planted["root"]), _cfg(label_column="school", labels_csv=str(csv),
                                                        labels_on="item_id")).report["retrieval"]
    assert ret["n_queries"] == 12 and ret["unlabelled"] == n - 12
    assert ret["precision@1"] == 1.0 and ret["precision@5"] == pytest.approx(3 / 5)
    assert ret["labels_csv_rows"] == n + 3 and ret["labels_csv_duplicate_keys"] == 2
    assert ret["labels_csv_matched"] == n and ret["images_matched"] == n
    assert ret["label_source"] == "labels.csv:school joined on item_id"
    # the join column must be in both files: one line naming the flag, the file and its columns
    with pytest.raises(UserError, match=r"--labels-on uuid: .*labels.csv has no column 'uuid' \(columns: item_id, "
                                        r"school\)"):
        evaluation.evaluate(str(planted["root"]), _cfg(label_column="school", labels_csv=str(csv), labels_on="uuid"))
    rows.rename(columns={"item_id": "inventory"}).to_csv(csv, index=False)
    with pytest.raises(UserError, match=r"--labels-on inventory: .*manifest.csv has no column 'inventory' "
                                        r"\(columns: .*objectid, .*item_id, museum\)"):
        evaluation.evaluate(str(planted["root"]), _cfg(label_column="school", labels_csv=str(csv),
                                                       labels_on="inventory"))
    with pytest.raises(UserError, match="--labels-on item_id: only joins a --labels-csv"):
        evaluation.evaluate(str(planted["root"]), _cfg(labels_on="item_id"))


def test_labels_on_name_needs_no_manifest(planted, tmp_path):
    (planted["root"] / "manifest.csv").unlink()
    school = np.where(np.isin(planted["group_of"], [0, 1, 2]), "Sienese", "")
    csv = tmp_path / "labels.csv"
    # the key may be a path: only the file name is compared
    pd.DataFrame({"file": [f"scans/{nm}" for nm in planted["names"]], "objectid": planted["objectids"],
                  "school": school}).to_csv(csv, index=False)
    ret = evaluation.evaluate(str(planted["root"]), _cfg(label_column="school", labels_csv=str(csv),
                                                        labels_on="name")).report["retrieval"]
    assert ret["n_queries"] == 12 and ret["precision@1"] == 1.0 and ret["labels_csv_matched"] == 80
    # without the manifest, the default run reports retrieval as skipped ...
    rep = evaluation.evaluate(str(planted["root"]), _cfg()).report
    assert rep["retrieval"]["status"].startswith("skipped: manifest.csv not present")
    # ... and one that asks for labels the manifest would give is an error
    for kw in (dict(label_column="attribution"), dict(label_column="school", labels_csv=str(csv))):
        with pytest.raises(UserError, match="retrieval cannot run: .*manifest.csv"):
            evaluation.evaluate(str(planted["root"]), _cfg(**kw))


def test_an_asked_for_retrieval_that_cannot_run_exits_2_with_one_line(planted, tmp_path):
    root = planted["root"]
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"objectid": planted["objectids"], "school": "x"}).to_csv(csv, index=False)
    (root / "manifest.csv").rename(tmp_path / "manifest.csv")
    proc = run_script("evaluate_unsupervised.py", "--data-dir", root, "--labels-csv", csv, "--label-column",
                      "school", "--skip-copies", "--skip-pixels", "--no-progress", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"--labels-csv {csv}: retrieval cannot run" in proc.stderr and "manifest.csv does not exist" in proc.stderr
    assert not (root / "evaluation.json").exists()
    # not asked for: the same collection is evaluated, retrieval skipped
    proc = run_script("evaluate_unsupervised.py", "--data-dir", root, "--skip-copies", "--skip-pixels",
                      "--no-progress")
    assert "skipped: manifest.csv not present" in proc.stdout
    # asked for, but no label has two members (every painting its own title)
    (tmp_path / "manifest.csv").rename(root / "manifest.csv")
    proc = run_script("evaluate_unsupervised.py", "--data-dir", root, "--label-column", "title", "--skip-copies",
                      "--skip-pixels", "--no-progress", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--label-column title: retrieval cannot run: no 'title' label has two or more" in proc.stderr


def test_a_metric_whose_interval_contains_chance_is_flagged(planted, tmp_path):
    # a label drawn at random: the neighbours cannot do better than a random ranking
    rng = np.random.default_rng(4)
    csv = tmp_path / "coin.csv"
    pd.DataFrame({"objectid": planted["objectids"], "side": rng.choice(["heads", "tails"], 80)}).to_csv(csv, index=False)
    out = tmp_path / "coin.json"
    proc = run_script("evaluate_unsupervised.py", "--data-dir", planted["root"], "--labels-csv", csv,
                      "--label-column", "side", "--skip-copies", "--skip-pixels", "--no-progress", "--output", out)
    ret = json.loads(out.read_text())["retrieval"]
    flagged = ret["indistinguishable_from_chance"]
    assert {"precision@5", "precision@10"} <= set(flagged)
    for m, (lo, hi) in ret["ci95"].items():
        assert (lo <= ret["chance"][m] <= hi) == (m in flagged)
        assert lo <= ret[m] <= hi
    assert ret["chance"]["precision@5"] == pytest.approx(ret["random_precision"])
    assert ret["bootstrap"] == {"resampled": "queries", "n_boot": 1000, "seed": 0, "level": 0.95,
                                "method": "percentile"}
    assert f"{ret['precision@10']:.3f}~" in proc.stdout and "~ chance" in proc.stdout
    assert "~ chance: the 95% interval contains the chance level" in proc.stdout
    # the planted artists are found far above chance: nothing flagged, no legend
    proc = run_script("evaluate_unsupervised.py", "--data-dir", planted["root"], "--skip-copies", "--skip-pixels",
                      "--no-progress")
    ret = json.loads((planted["root"] / "evaluation.json").read_text())["retrieval"]
    assert ret["indistinguishable_from_chance"] == [] and "~" not in proc.stdout
    assert ret["chance"]["precision@1"] == pytest.approx(3 / 79)
    assert ret["chance"]["recall@10"] == pytest.approx(10 / 79)


def test_help_shows_the_real_defaults_of_flags_parsed_as_none():
    # None tells "asked for" from "default"; --help must still show what the default is
    import evaluate_unsupervised

    parser = evaluate_unsupervised.build_parser()
    text = " ".join(parser.format_help().split())
    for flag, shown in (("--label-column", "attribution"), ("--labels-on", "objectid"), ("--copy-sample", "50"),
                        ("--copy-seeds", "3"), ("--pixel-sample", "100"), ("--bootstrap", "1000")):
        help_text = " ".join(next(a.help for a in parser._actions if flag in a.option_strings).split())
        assert f"(default: {shown})" in text and "None" not in help_text % {"default": None}, flag
    assert "(default: unknown, unknown artist," in text
    args = parser.parse_args([])
    assert args.label_column is None and args.copy_sample is None and args.n_boot == 1000
