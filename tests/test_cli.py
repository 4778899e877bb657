"""The command-line layer: flag types with bounds, configs from flags, one line per error."""
from __future__ import annotations

import argparse
import dataclasses
import importlib

import pytest

from helpers import run_script
from paintsim import cli
from paintsim.errors import BadValue, UserError


def test_memory_size_parses_units():
    assert cli.memory_size("512M") == 512 * 2**20
    assert cli.memory_size("1.5GiB") == int(1.5 * 2**30)
    assert cli.memory_size("1000") == 1000
    for bad in ("lots", "0", "-5M", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.memory_size(bad)


def test_int_and_float_ranges_refuse_values_outside_their_bounds():
    size = cli.int_range(1, 8192)
    assert size("512") == 512
    for bad, words in (("0", "at least 1"), ("100000", "at most 8192"), ("2.5", "whole number")):
        with pytest.raises(argparse.ArgumentTypeError, match=words):
            size(bad)
    timeout = cli.float_range(0, lo_open=True)
    assert timeout("0.5") == 0.5
    for bad in ("0", "-1", "inf", "nan", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            timeout(bad)


@pytest.mark.parametrize("script,config", [
    ("extract_features", "paintsim.extract:ExtractConfig"),
    ("evaluate_unsupervised", "paintsim.evaluation:EvalConfig"),
    ("download_images", "paintsim.download:DownloadOptions"),
    ("explore_collection", "paintsim.site:SiteConfig"),
    ("extract_faces", "paintsim.faces:FaceConfig"),
])
def test_each_config_field_has_its_flag_with_the_same_default(script, config):
    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    args = importlib.import_module(script).build_parser().parse_args([])
    built = cli.config_from_args(cls, args)
    flags = vars(args)
    unflagged = {"extra_meta", "copy_kinds", "fetch", "tables_url", "data_dir"} & {f.name for f in
                                                                                 dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if f.name in unflagged or f.name == "progress":
            continue
        assert f.name in flags, f"{cls.__name__}.{f.name} has no flag in {script}.py"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert getattr(built, f.name) == default, (f.name, getattr(built, f.name), default)


def test_run_main_names_the_flag_of_a_bad_value_and_exits_2(caplog):
    parser = cli.make_parser("test")

    def main(args):
        raise BadValue("block_size", 0, "must be at least 1")

    assert cli.run_main(main, parser, []) == 2
    assert "--block-size 0: must be at least 1" in caplog.text

    def missing(args):
        raise UserError("features.npy is damaged")

    assert cli.run_main(missing, parser, []) == 2
    assert "features.npy is damaged" in caplog.text


def test_bad_flag_values_stop_before_any_work(tmp_path):
    for script, flag, value, words in [
        ("display_similar.py", "--thumb-size", "0", "must be at least 16"),
        ("evaluate_unsupervised.py", "--pixel-size", "100000", "must be at most 1024"),
        ("evaluate_unsupervised.py", "--seed", "-1", "must be at least 0"),
        ("download_images.py", "--size", "100000", "must be at most 8192"),
        ("download_images.py", "--read-timeout", "0", "must be greater than 0"),
        ("download_images.py", "--max-retries", "-1", "must be at least 0"),
        ("compute_similarity.py", "--block-size", "0", "must be at least 1"),
    ]:
        extra = ["--random"] if script == "display_similar.py" else []
        proc = run_script(script, "--data-dir", tmp_path, flag, value, *extra, check=False, timeout=60)
        assert proc.returncode == 2 and f"argument {flag}: {words}" in proc.stderr, (script, proc.stderr)
        assert "Traceback" not in proc.stderr
