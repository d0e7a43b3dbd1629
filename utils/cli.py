"""The rules every command-line tool of this project follows, written once.

An expected user error (a missing, unreadable or damaged file, a bad value: OSError or ValueError, whose message
names the file or value) ends in one line on stderr, ``PROG: error: MESSAGE``, and exit status 1, without a
traceback; any other exception is a bug and keeps its traceback. Arguments are checked when they are parsed
(the argparse types below), before any long work starts.
"""
import argparse
import os
import sys

USER_ERRORS = (OSError, ValueError)


def run(body, prog):
    """``body()``'s exit status (None counts as 0); a USER_ERRORS exception is printed as one line and gives 1."""
    try:
        status = body()
    except USER_ERRORS as error:
        message = "; ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
        print("%s: error: %s" % (prog, message or type(error).__name__), file=sys.stderr)
        return 1
    return 0 if status is None else int(status)


def int_at_least(low):
    """An argparse type: an integer >= ``low`` (argparse names the option in its error)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("expected an integer, got %r" % text) from None
        if value < low:
            raise argparse.ArgumentTypeError("must be >= %d, got %d" % (low, value))
        return value
    parse.__name__ = "integer >= %d" % low
    return parse


def image_size(text):
    """An argparse type: 'H,W' or one size 'S' (square) -> (H, W) of positive integers."""
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError("expected HEIGHT,WIDTH (or one size) of positive integers, got %r" % text)
    return size


def _writable_folder(folder, path, what):
    """The existing folder that holds (or will hold, once the missing folders are made) ``folder``;
    NotADirectoryError / PermissionError naming ``what`` and ``path`` when nothing can be written there."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError("%s %s: %s is a file, not a folder" % (what, path, folder))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError("%s %s: cannot write into %s" % (what, path, folder))
    return folder


def check_output_file(path, what):
    """Refuse, before any long work, an output file (``what``: the option or argument naming it) that is a folder
    or whose folder cannot be made or written into."""
    if os.path.isdir(path):
        raise IsADirectoryError("%s %s is a folder; give the file to write" % (what, path))
    _writable_folder(os.path.dirname(os.path.abspath(path)), path, what)


def check_output_dir(path, what):
    """Refuse, before any long work, an output folder that is a file or cannot be made or written into."""
    _writable_folder(path, path, what)
