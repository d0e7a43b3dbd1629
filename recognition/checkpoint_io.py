"""Atomic writing of checkpoint folders: a crash mid-write never spoils the last good checkpoint.

Single files are written atomically by ``utils/fileio.py`` (temporary name, fsync, rename). A multi-file
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

from utils.fileio import TMP_SUFFIX, atomic_save_ndarrays, atomic_write_bytes, fsync_path

COMPLETE = "COMPLETE"       # marker written last into a folder checkpoint
_STAGING, _OLD = TMP_SUFFIX, ".old"


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
            fsync_path(os.path.join(folder, name))
        fsync_path(folder, directory=True)
    atomic_write_bytes(os.path.join(tmp_dir, COMPLETE), b"")
    final_dir = os.path.normpath(final_dir)
    old = final_dir + _OLD
    if os.path.exists(final_dir):
        remove_dir(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    fsync_path(os.path.dirname(os.path.abspath(final_dir)), directory=True)
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
