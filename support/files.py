"""The one way this project writes a file: atomically, so that a kill never leaves half a file under its name.

Standard library only. Every file the project writes (checkpoints, loss.csv, PNGs, .npz samples, downloads,
the evaluation cache, results of the tools) goes through write_atomically.
"""
import contextlib
import os
import tempfile

TEMPORARY_PREFIX = "."
TEMPORARY_SUFFIX = ".tmp"


def temporary_name_prefix(path):
    """Return the prefix of the temporary files write_atomically makes for path: '.<name>-'."""
    return f"{TEMPORARY_PREFIX}{os.path.basename(path)}-"


def is_temporary_of(name, path):
    """Return True when the file name is one of write_atomically's temporary files for path."""
    return name.startswith(temporary_name_prefix(path)) and name.endswith(TEMPORARY_SUFFIX)


def current_umask():
    """Return the process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path, write):
    """Return path after writing it through write(binary_stream): a temporary file beside path, fsynced, renamed.

    A kill at any moment leaves either the old file or the new one under path, never a part of either. The new
    file gets the permissions any new file gets here (0666 minus the umask), not mkstemp's private 0600. If write
    raises, the temporary file is removed and path is untouched. The temporary file is named '.<name>-XXXX.tmp',
    so a later run can remove one that a kill left behind (is_temporary_of).
    """
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=temporary_name_prefix(path), suffix=TEMPORARY_SUFFIX, dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return path


def write_bytes_atomically(path, payload):
    """Return path after writing the bytes payload there with write_atomically."""
    return write_atomically(path, lambda stream: stream.write(payload))
