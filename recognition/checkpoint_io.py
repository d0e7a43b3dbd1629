"""Atomic writing of checkpoint files and folders: a crash mid-write never spoils the last good checkpoint.

A file is written under a temporary name in its own folder, fsynced, then renamed over the final name
(``os.replace`` is atomic on POSIX): readers see the old file or the new one, never a part. A multi-file
checkpoint is assembled in ``<final>.tmp`` (every rank may write into it), fsynced, marked with a ``COMPLETE``
file, and renamed into place; ``latest_complete`` only returns marked folders, never ``.tmp`` ones.

Multi-rank use:   rank 0: tmp = prepare_dir(final); barrier; every rank writes into staging_dir(final);
                  barrier; rank 0: commit_dir(tmp, final).
Single process:   with atomic_dir(final) as tmp: write files into tmp.
"""
import contextlib
import fnmatch
import os
import re
import shutil
import tempfile
import zipfile

import numpy as np

COMPLETE = "COMPLETE"       # marker written last into a folder checkpoint
_STAGING, _OLD = ".tmp", ".old"
_UMASK = os.umask(0o022)    # read the process umask (os.umask can only read it by setting it) ...
os.umask(_UMASK)            # ... and put it back


def _fsync_path(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:       # some file systems cannot fsync a directory; the rename is still atomic
        if not directory:
            raise
    finally:
        os.close(fd)


def _atomic_file(path, write):
    """Call ``write(tmp_path)``, fsync the result and rename it to ``path``; on any failure the temporary file
    is removed and ``path`` keeps its previous content."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=_STAGING, dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)      # mkstemp makes 0600; a checkpoint gets the usual permissions
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_path(folder, directory=True)


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    _atomic_file(path, write)


def atomic_save_ndarrays(path, arrays):
    """``mx.nd.save(path, arrays)`` (a dict of NDArrays), atomically."""
    import mxnet as mx
    _atomic_file(path, lambda tmp: mx.nd.save(tmp, arrays))


def atomic_save_numpy(path, arrays):
    """Save a dict of arrays in ``np.savez``'s format (``np.load`` reads it), atomically; ``path`` is used as
    given (no '.npz' appended). Object arrays are refused (a checkpoint must not need pickle to load)."""
    def write(tmp):
        # np.savez's own zip stays open when an array fails to convert; this one is closed on every path
        with open(tmp, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, value in arrays.items():
                with archive.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    _atomic_file(path, write)


def save_legacy_checkpoint(prefix, epoch, symbol, arg_params, aux_params):
    """Write PREFIX-symbol.json and PREFIX-%04d.params (keys 'arg:NAME' / 'aux:NAME', on the CPU), each
    atomically, in the layout ``mx.model.load_checkpoint(prefix, epoch)`` reads. Every parameter must belong to
    ``symbol`` (a parameter of another graph would load silently and be ignored)."""
    import mxnet as mx
    for kind, params, names in (("arg", arg_params, symbol.list_arguments()),
                                ("aux", aux_params, symbol.list_auxiliary_states())):
        stray = sorted(set(params) - set(names))
        if stray:
            raise ValueError("%s_params holds %s, not %s of the symbol being saved as %s"
                             % (kind, ", ".join(stray[:5]), "arguments" if kind == "arg" else "auxiliary states",
                                prefix))
    params = {"arg:" + k: v.as_in_context(mx.cpu()) for k, v in arg_params.items()}
    params.update({"aux:" + k: v.as_in_context(mx.cpu()) for k, v in aux_params.items()})
    atomic_write_bytes("%s-symbol.json" % prefix, symbol.tojson().encode())
    atomic_save_ndarrays("%s-%04d.params" % (prefix, epoch), params)


def remove_dir(folder):
    """Delete a folder tree if it exists."""
    shutil.rmtree(folder, ignore_errors=True)


def staging_dir(final_dir):
    """The temporary folder in which ``final_dir`` is assembled (the same name on every rank)."""
    return os.path.normpath(final_dir) + _STAGING


def prepare_dir(final_dir):
    """Create an empty staging folder for ``final_dir`` (removing what an interrupted save left) and return it."""
    tmp = staging_dir(final_dir)
    remove_dir(tmp)
    os.makedirs(tmp)
    return tmp


def commit_dir(tmp_dir, final_dir):
    """Make the fully written ``tmp_dir`` visible as ``final_dir``: fsync its files, write the COMPLETE marker,
    rename. An older ``final_dir`` is first moved to ``final_dir.old`` (a crash between the two renames leaves
    that complete folder, which ``latest_complete`` still finds) and deleted once the new one is in place."""
    for folder, _, files in os.walk(tmp_dir):
        for name in files:
            _fsync_path(os.path.join(folder, name))
        _fsync_path(folder, directory=True)
    atomic_write_bytes(os.path.join(tmp_dir, COMPLETE), b"")
    final_dir = os.path.normpath(final_dir)
    old = final_dir + _OLD
    if os.path.exists(final_dir):
        remove_dir(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync_path(os.path.dirname(os.path.abspath(final_dir)), directory=True)
    remove_dir(old)


@contextlib.contextmanager
def atomic_dir(final_dir):
    """``with atomic_dir(final) as tmp:`` write files into ``tmp``; on a normal exit it becomes ``final``
    (replacing an older one); on an exception ``tmp`` is deleted and any previous ``final`` stays as it was."""
    tmp = prepare_dir(final_dir)
    try:
        yield tmp
    except BaseException:
        remove_dir(tmp)
        raise
    commit_dir(tmp, final_dir)


def _natural_key(name):
    """'step_10' after 'step_9': digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def latest_complete(root, pattern="*"):
    """The newest complete checkpoint folder under ``root`` whose name matches the glob ``pattern`` (newest by
    name, digit runs compared as numbers), or None. Complete means committed with its COMPLETE marker; staging
    (``.tmp``) folders are ignored, and a ``NAME.old`` left by a crash mid-commit stands in for a missing NAME."""
    if not os.path.isdir(root):
        return None
    found = {}
    for entry in os.listdir(root):
        name = entry[:-len(_OLD)] if entry.endswith(_OLD) else entry
        path = os.path.join(root, entry)
        if entry.endswith(_STAGING) or not fnmatch.fnmatch(name, pattern):
            continue
        if not os.path.isfile(os.path.join(path, COMPLETE)):
            continue
        if name not in found or entry == name:      # a committed NAME wins over NAME.old
            found[name] = path
    if not found:
        return None
    return found[max(found, key=_natural_key)]



def save_params(path, arg_params, aux_params):
    """A network's parameters in MXNet's ``.params`` layout (keys 'arg:NAME' / 'aux:NAME', on the CPU),
    atomically: what ``load_params`` and ``mx.model.load_checkpoint`` read."""
    import mxnet as mx
    arrays = {"arg:" + k: v.as_in_context(mx.cpu()) for k, v in arg_params.items()}
    arrays.update({"aux:" + k: v.as_in_context(mx.cpu()) for k, v in aux_params.items()})
    atomic_save_ndarrays(path, arrays)


def load_params(path):
    """(arg_params, aux_params) of a ``.params`` file written by ``save_params``."""
    import mxnet as mx
    saved = mx.nd.load(path)
    return ({k[4:]: v for k, v in saved.items() if k.startswith("arg:")},
            {k[4:]: v for k, v in saved.items() if k.startswith("aux:")})
