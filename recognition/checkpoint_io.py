"""Atomic writing of checkpoint folders: a crash mid-write never spoils the last good checkpoint.

Single files are written atomically by ``utils/fileio.py`` (temporary name, fsync, rename). A multi-file
checkpoint is assembled in ``<final>.tmp`` (every rank may write into it), fsynced, marked with a ``COMPLETE``
file, and renamed into place; ``latest_complete`` only returns marked folders, never ``.tmp`` ones.

Multi-rank use:   rank 0: tmp = prepare_dir(final); barrier; every rank writes into staging_dir(final);
                  barrier; rank 0: commit_dir(tmp, final).
Single process:   with atomic_dir(final) as tmp: write files into tmp.

The COMPLETE marker holds the folder's manifest: every file's size and CRC-32, so a file damaged after the
checkpoint was written (a truncated copy, a bad disk) is found before it is loaded (``verify_files``).
"""
import contextlib
import fnmatch
import json
import os
import re
import shutil
import zlib

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


def file_checksum(path, chunk=1 << 24):
    """(size in bytes, CRC-32) of a file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return size, crc
            crc, size = zlib.crc32(block, crc), size + len(block)


def folder_files(folder):
    """The files under ``folder`` (relative paths, sorted), the COMPLETE marker excluded."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.relpath(os.path.join(parent, name), folder) for name in files]
    return sorted(f for f in found if f != COMPLETE)


def checksums(folder, names):
    """{name: [size, crc32]} of the files ``names`` (relative to ``folder``)."""
    return {name: list(file_checksum(os.path.join(folder, name))) for name in names}


def commit_dir(tmp_dir, final_dir, manifest=None):
    """Make the fully written ``tmp_dir`` visible as ``final_dir``: fsync its files, write the COMPLETE marker
    with the manifest (``checksums`` of every file; computed here when not given), rename. An older
    ``final_dir`` is first moved to ``final_dir.old`` (a crash between the two renames leaves that complete
    folder, which ``latest_complete`` still finds) and deleted once the new one is in place."""
    for folder, _, files in os.walk(tmp_dir):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder, directory=True)
    if manifest is None:
        manifest = checksums(tmp_dir, folder_files(tmp_dir))
    atomic_write_bytes(os.path.join(tmp_dir, COMPLETE), json.dumps({"files": manifest}, sort_keys=True).encode())
    final_dir = os.path.normpath(final_dir)
    old = final_dir + _OLD
    if os.path.exists(final_dir):
        remove_dir(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    fsync_path(os.path.dirname(os.path.abspath(final_dir)), directory=True)
    remove_dir(old)


def read_manifest(folder):
    """{name: [size, crc32]} of a committed folder, or None for a folder committed before manifests existed (an
    empty marker). A marker that is not a manifest raises ValueError naming it."""
    path = os.path.join(folder, COMPLETE)
    with open(path, "rb") as f:
        text = f.read()
    if not text:
        return None
    try:
        files = json.loads(text.decode("utf-8"))["files"]
        return {str(k): [int(v[0]), int(v[1])] for k, v in files.items()}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise ValueError("%s is not a checkpoint manifest (damaged)" % path) from None


def verify_files(folder, manifest, names):
    """Problems (messages naming the file) of the files ``names`` of ``folder`` against ``manifest``."""
    problems = []
    for name in names:
        path = os.path.join(folder, name)
        want_size, want_crc = manifest[name]
        if not os.path.isfile(path):
            problems.append("%s is missing" % path)
            continue
        size, crc = file_checksum(path)
        if size != want_size:
            problems.append("%s has %d bytes, %d when written" % (path, size, want_size))
        elif crc != want_crc:
            problems.append("%s does not match its checksum (CRC-32 %08x, %08x when written)" % (path, crc,
                                                                                                 want_crc))
    return problems


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


def complete_folders(root, pattern="*"):
    """The complete checkpoint folders under ``root`` whose names match the glob ``pattern``, newest first (by
    name, digit runs compared as numbers). Complete means committed with its COMPLETE marker; staging (``.tmp``)
    folders are ignored, and a ``NAME.old`` left by a crash mid-commit stands in for a missing NAME."""
    if not os.path.isdir(root):
        return []
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
    return [found[name] for name in sorted(found, key=_natural_key, reverse=True)]


def latest_complete(root, pattern="*"):
    """The newest of ``complete_folders(root, pattern)``, or None."""
    folders = complete_folders(root, pattern)
    return folders[0] if folders else None


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
