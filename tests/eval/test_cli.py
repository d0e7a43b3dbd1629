"""eval/cli.py: the --model / --onnx arguments both evaluation CLIs share, their checks before any loading, and
the one-line handling of user errors."""
import argparse

import pytest

from eval import cli


def test_model_arguments_take_exactly_one_model(tmp_path, capsys):
    def parse(argv):
        parser = argparse.ArgumentParser()
        cli.add_model_arguments(parser)
        return parser.parse_args(argv)

    for argv in ([], ["--model", "m,1", "--onnx", "m.onnx"]):
        with pytest.raises(SystemExit):
            parse(argv)
    assert "--model" in capsys.readouterr().err
    args = parse(["--onnx", str(tmp_path / "absent.onnx")])
    assert cli.model_name(args) == str(tmp_path / "absent.onnx")
    with pytest.raises(FileNotFoundError, match=r"ONNX model not found: .*absent\.onnx"):
        cli.check_model_arguments(args)
    with pytest.raises(FileNotFoundError, match=r"model file not found: .*m-symbol\.json"):
        cli.check_model_arguments(parse(["--model", str(tmp_path / "m") + ",1"]))
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parse(["--model", "m,1", "--batch-size", bad])
        assert "argument --batch-size: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="--ctx must be cpu, gpu or gpu:N, got 'tpu'"):
        cli.check_model_arguments(parse(["--model", "m,1", "--ctx", "tpu"]))
