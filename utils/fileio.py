"""Atomic file writes: a crash or an error mid-write never leaves a part-written file under the final name.

A file is written under a temporary name in its own folder, fsynced, then renamed over the final name
(``os.replace`` is atomic on POSIX): readers see the old file or the new one, never a part. ``atomic_files``
does the same for a set of files that belong together (a ``.rec`` and its ``.idx``): either all of them are
replaced, or none is.
"""
import contextlib
import os
import tempfile
import zipfile

import numpy as np

TMP_SUFFIX = ".tmp"         # temporary files and folders end with it: readers and listings skip them
_UMASK = os.umask(0o022)    # read the process umask (os.umask can only read it by setting it) ...
os.umask(_UMASK)            # ... and put it back


def fsync_path(path, directory=False):
    """fsync a file (or, with ``directory``, a folder's entries, where the file system allows it)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:       # some file systems cannot fsync a directory; the rename is still atomic
        if not directory:
            raise
    finally:
        os.close(fd)


def _temporary_name(path):
    """A new empty file beside ``path`` (same folder: the rename stays on one file system), usual permissions."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)      # mkstemp makes 0600; an output file gets the usual permissions
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


@contextlib.contextmanager
def atomic_files(*paths):
    """``with atomic_files(a, b) as (tmp_a, tmp_b):`` write the files under the temporary names; on a normal
    exit each is fsynced and renamed over its final name, on an exception they are removed and ``a`` and ``b``
    keep their previous content. (The renames follow one another: a crash between two of them can leave a new
    ``a`` beside an old ``b``; what they guard against is a failed or interrupted writer.)"""
    temporaries = []
    try:
        for path in paths:
            temporaries.append(_temporary_name(path))
        yield tuple(temporaries)
        for tmp in temporaries:
            fsync_path(tmp)
        for tmp, path in zip(temporaries, paths):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise
    for folder in sorted({os.path.dirname(os.path.abspath(path)) for path in paths}):
        fsync_path(folder, directory=True)


def atomic_file(path, write):
    """Call ``write(tmp_path)``, fsync the result and rename it to ``path``; on any failure the temporary file
    is removed and ``path`` keeps its previous content."""
    with atomic_files(path) as (tmp,):
        write(tmp)


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_file(path, write)


def atomic_save_ndarrays(path, arrays):
    """``mx.nd.save(path, arrays)`` (a dict of NDArrays), atomically."""
    import mxnet as mx
    atomic_file(path, lambda tmp: mx.nd.save(tmp, arrays))


def atomic_save_numpy(path, arrays):
    """Save a dict of arrays in ``np.savez``'s format (``np.load`` reads it), atomically; ``path`` is used as
    given (no '.npz' appended). Object arrays are refused (a saved state must not need pickle to load)."""
    def write(tmp):
        # np.savez's own zip stays open when an array fails to convert; this one is closed on every path
        with open(tmp, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, value in arrays.items():
                with archive.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    atomic_file(path, write)
