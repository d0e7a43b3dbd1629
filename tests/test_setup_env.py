"""tools/setup_env.sh: which Python a new .venv is made with, on a fake PATH of stub interpreters (no venv is made)."""
import os
import shutil
import subprocess

import pytest

from tests.harness import ROOT

SCRIPT = os.path.join(ROOT, "tools", "setup_env.sh")


def stub(folder, name, answer):
    """An executable ``name`` that answers the script's probe with ``answer`` ("3.11 venv", ...), or fails (None)."""
    path = os.path.join(str(folder), name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + ('echo "%s"\n' % answer if answer else "exit 1\n"))
    os.chmod(path, 0o755)
    return path


def run(tmp_path, stubs, python=None, script=SCRIPT, args=("--find-python",)):
    """Run the script with only ``stubs`` ({name: answer}) and the tools it needs on PATH."""
    bin_dir, tools = tmp_path / "bin", tmp_path / "tools"
    bin_dir.mkdir()
    tools.mkdir()
    for tool in ("dirname", "cat", "sha256sum", "cut"):
        os.symlink(shutil.which(tool), str(tools / tool))
    for name, answer in stubs.items():
        stub(bin_dir, name, answer)
    env = {"PATH": "%s:%s" % (bin_dir, tools), "HOME": str(tmp_path)}
    if python:
        env["PYTHON"] = python
    return subprocess.run([shutil.which("bash"), script] + list(args), env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_newest_usable_version_wins_and_is_named(tmp_path):
    done = run(tmp_path, {"python3": "3.12 venv", "python3.9": "3.9 venv", "python3.11": "3.11 venv",
                          "python3.10": "3.10 venv"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == str(tmp_path / "bin" / "python3.11")
    assert "Python 3.11" in done.stdout


def test_too_new_broken_and_venv_less_interpreters_are_passed_over(tmp_path):
    done = run(tmp_path, {"python3": "3.13 venv", "python3.10": "3.10 no-venv", "python3.9": None,
                          "python3.8": "3.8 venv"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == str(tmp_path / "bin" / "python3.8")


def test_plain_python3_is_used_when_it_is_supported(tmp_path):
    done = run(tmp_path, {"python3": "3.10 venv"})
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == str(tmp_path / "bin" / "python3")


def test_an_explicit_python_is_honoured(tmp_path):
    custom = stub(tmp_path, "my-python", "3.9 venv")
    done = run(tmp_path, {"python3.11": "3.11 venv"}, python=custom)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == custom
    assert "PYTHON=%s (Python 3.9)" % custom in done.stdout


def test_an_explicit_python_that_is_too_new_stops_with_its_name(tmp_path):
    custom = stub(tmp_path, "new-python", "3.12 venv")
    done = run(tmp_path, {"python3.11": "3.11 venv"}, python=custom)
    assert done.returncode == 1
    assert "PYTHON=%s" % custom in done.stderr and "is Python 3.12" in done.stderr


@pytest.mark.parametrize("stubs", [{}, {"python3": "3.13 venv", "python3.11": "3.11 no-venv"}])
def test_without_a_usable_python_it_stops_with_the_commands_that_get_one(tmp_path, stubs):
    done = run(tmp_path, stubs)
    assert done.returncode == 1 and not done.stdout.strip()
    for command in ("sudo apt-get install python3.11 python3.11-venv", "sudo dnf install python3.11",
                    "uv python install 3.11", "PYTHON=$(uv python find 3.11) make setup"):
        assert command in done.stderr
    if stubs:                                            # and why each one found was not taken
        assert "python3 is Python 3.13" in done.stderr
        assert "python3.11 is Python 3.11 without venv/ensurepip" in done.stderr
        assert "apt-get install python3.11-venv" in done.stderr
    else:
        assert "none of python3.11, python3.10, python3.9, python3.8, python3 is on PATH" in done.stderr


def test_an_existing_venv_of_an_unsupported_python_is_refused(tmp_path):
    # a copy of the script in a scratch checkout whose .venv was made with Python 3.12: no pip runs
    checkout = tmp_path / "checkout"
    (checkout / "tools").mkdir(parents=True)
    (checkout / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(SCRIPT, str(checkout / "tools" / "setup_env.sh"))
    (checkout / "requirements.txt").write_text("mxnet==1.9.1\n")
    stub(checkout / ".venv" / "bin", "python", "3.12 venv")
    done = run(tmp_path, {"python3.11": "3.11 venv"}, script=str(checkout / "tools" / "setup_env.sh"), args=())
    assert done.returncode == 1
    assert ".venv/bin/python is not Python 3.8-3.11 (it is 3.12)" in done.stderr and "rm -rf .venv" in done.stderr
