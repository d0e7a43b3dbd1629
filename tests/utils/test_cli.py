"""utils/cli.py: user errors end in one line and status 1, bugs keep their traceback; the argparse types."""
import argparse
import os

import pytest

from utils import cli


def test_user_errors_are_one_line_and_bugs_are_not_caught(capsys):
    assert cli.run(lambda: None, "tool") == 0
    assert cli.run(lambda: 3, "tool") == 3

    def missing():
        raise FileNotFoundError("record file not found: /data/train.rec")

    def bad_value():
        raise ValueError("property says 96x96\n  but the images are 112x112")

    assert cli.run(missing, "tool") == 1
    assert capsys.readouterr().err == "tool: error: record file not found: /data/train.rec\n"
    assert cli.run(bad_value, "tool") == 1
    assert capsys.readouterr().err == "tool: error: property says 96x96; but the images are 112x112\n"

    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run(bug, "tool")


def test_argument_types():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=cli.int_at_least(1))
    parser.add_argument("--image-size", type=cli.image_size)
    args = parser.parse_args(["--workers", "3", "--image-size", "96"])
    assert args.workers == 3 and args.image_size == (96, 96)
    assert parser.parse_args(["--image-size", "112,96"]).image_size == (112, 96)
    for argv in (["--workers", "0"], ["--workers", "x"], ["--image-size", "0,4"], ["--image-size", "1,2,3"],
                 ["--image-size", "a"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_output_checks(tmp_path):
    (tmp_path / "file").write_text("")
    cli.check_output_file(str(tmp_path / "new" / "deeper" / "x.png"), "OUT")      # missing folders are made later
    cli.check_output_dir(str(tmp_path / "new" / "results"), "--result-dir")
    with pytest.raises(IsADirectoryError, match="OUT %s is a folder" % tmp_path):
        cli.check_output_file(str(tmp_path), "OUT")
    with pytest.raises(NotADirectoryError, match="OUT %s: %s is a file" % (tmp_path / "file" / "x", tmp_path / "file")):
        cli.check_output_file(str(tmp_path / "file" / "x"), "OUT")
    with pytest.raises(NotADirectoryError, match="--result-dir %s: %s is a file" % ((tmp_path / "file",) * 2)):
        cli.check_output_dir(str(tmp_path / "file"), "--result-dir")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(str(locked), os.W_OK):                 # root writes anywhere: nothing to refuse then
        with pytest.raises(PermissionError, match="cannot write into %s" % locked):
            cli.check_output_file(str(locked / "x.onnx"), "--output")
