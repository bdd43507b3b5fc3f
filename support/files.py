"""The one way this project writes a file: atomically, so that a kill never leaves half a file under its name.

Standard library only. Every file the project writes (checkpoints, loss.csv, PNGs, .npz samples, downloads,
the evaluation cache, results of the tools) goes through write_atomically.
"""
import contextlib
import os
import tempfile

TEMPORARY_PREFIX = "."
TEMPORARY_SUFFIX = ".tmp"


class OutputError(Exception):
    """An output that cannot be written where it was asked for (one-line message: which path, why, what to do)."""


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
    raises, the temporary file is removed and path is untouched; an error of the file system (disk full, no
    permission) names path, not the temporary file. The temporary file is named '.<name>-XXXX.tmp', so a later
    run can remove one that a kill left behind (is_temporary_of).
    """
    folder = os.path.dirname(os.path.abspath(path))
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=temporary_name_prefix(path), suffix=TEMPORARY_SUFFIX, dir=folder)
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        if isinstance(error, OSError) and error.errno is not None and (
                error.filename is None or is_temporary_of(os.path.basename(str(error.filename)), path)):
            error.filename, error.filename2 = path, None
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


def creation_problem(path):
    """Return None when a file can be written at path now, else why not, in a few words naming the path at fault.

    Checks what write_atomically needs: path is not a folder, its nearest existing parent is a folder, and a file
    can be created there (probed with a temporary file of write_atomically's, removed at once). Creates nothing
    that stays: missing parent folders are left for the writer to create.
    """
    if os.path.isdir(path):
        return f"{path} is a folder"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    try:
        handle, probe = tempfile.mkstemp(prefix=temporary_name_prefix(path), suffix=TEMPORARY_SUFFIX, dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        return f"{folder} does not take new files ({error.strerror})"
    return None


def describe_os_error(error):
    """Return an OSError in one line: 'PATH: reason' (or just the reason when the error names no path)."""
    reason = error.strerror or str(error) or type(error).__name__
    where = f"{error.filename}: " if error.filename is not None else ""
    return " ".join(f"{where}{reason}".split())


def error_line(error):
    """Return the one line that reports an expected error: an OSError as 'PATH: reason' and what to check."""
    if isinstance(error, OSError):
        return f"{describe_os_error(error)} (check that path, its permissions and the space left on its disk)"
    return str(error)
