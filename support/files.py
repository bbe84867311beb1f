"""The one atomic file writer, the one lock, the one resumable downloader and the one array cache of the project."""
import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Open path.<pid>.tmp for writing and, when the block ends without an error, replace path with it in one step: a
    run killed mid-write leaves the previous file whole under the real name, and two processes writing the same file
    (two runs sharing a cache folder) each replace it whole. The data and the rename are synced to disk
    first (a power cut must not leave a renamed but empty file). A failed write (a full disk, a folder that is not
    writable) removes the .tmp and says which file failed, why, and that the previous one is intact. Text is written
    with "\\n" line ends."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
        kwargs.setdefault("newline", "\n")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        with contextlib.suppress(OSError):  # in a folder we may not write, there is no .tmp to remove either
            tmp.unlink(missing_ok=True)
        # torch.save reports a full disk as a RuntimeError from its zip writer ("inline_container ... unexpected pos")
        if isinstance(e, OSError) or "inline_container" in str(e) or "PytorchStreamWriter" in str(e):
            raise OSError(_write_error(path, e)) from e
        raise
    os.replace(tmp, path)
    _sync_folder(path.parent)


def _write_error(path, e):
    """One line for a write of path that failed with e: the cause the OS gave, in words (a folder that is not
    writable is no full disk), and whether the previous file survived."""
    try:
        kept = "the previous file is intact" if path.exists() else "no earlier file existed"
    except OSError:
        kept = "the previous file, if any, is untouched"
    code, name = getattr(e, "errno", None), getattr(e, "filename", None)
    folder = Path(name).parent if name else path.parent  # open(.tmp) or mkdir(folder) names what it tried to create
    if code in (errno.EACCES, errno.EPERM):
        return f"could not write {path} ({e.strerror}: {folder} is not writable); {kept}"
    if code == errno.EROFS:
        return f"could not write {path} ({e.strerror}: {folder} cannot be written); {kept}"
    if code in (errno.EEXIST, errno.ENOTDIR):
        return f"could not write {path} ({e.strerror}: {name}: a file stands where a folder should be); {kept}"
    if code in (errno.ENOSPC, errno.EDQUOT) or not isinstance(e, OSError):
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MB free"
        except OSError:
            free = "free space unknown"
        full = "The disk is full" if isinstance(e, OSError) else "Is the disk full?"  # torch's error does not say
        return f"could not write {path} ({e}); {kept}. {full} ({free})"
    return f"could not write {path} ({e}); {kept}"


def _sync_folder(folder):
    """Make a rename in folder durable (POSIX: fsync the directory; Windows cannot open one, nor needs to)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_durable(path, text):
    """Append text (ASCII: the comparison files' json.dumps escapes the rest) and make it durable before returning:
    written and fsynced, and the folder for a new file. A write that fails half way is cut back off, so the file
    never holds half a line that a retry would then follow."""
    path = Path(path)
    new, raw = not path.exists(), text.encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, start)
            os.fsync(fd)
            raise
    finally:
        os.close(fd)
    if new:
        _sync_folder(path.parent)


@contextlib.contextmanager
def hold_lock(path, busy):
    """Hold an exclusive lock on the file path for the block, with this process's pid written in it. A second
    holder is refused with SystemExit(busy.format(pid=the holder's pid)). The lock is the OS's (flock): it ends with
    the process however the process ends, so a killed run never leaves a stale lock behind. The file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        import fcntl  # Unix; on Windows nothing stops a second holder
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise SystemExit(busy.format(pid=pid)) from None
    try:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()


def run_lock(out_dir, stage):
    """One run of a stage per out-dir: a second run would write its weights, metrics and log beside the first's
    (sft.pt of one run with sft.json of the other) or die on their shared .tmp file. Under torchrun rank 0 holds it
    for the whole group (RANK is set before the process group forms)."""
    if int(os.environ.get("RANK", 0)):
        return contextlib.nullcontext()
    return hold_lock(Path(out_dir) / f"{stage}.lock",
                     f"{stage}.py: error: another {stage}.py (pid {{pid}}) is running in {out_dir} (it holds "
                     f"{Path(out_dir) / (stage + '.lock')}); wait for it to end, or give this run another --out-dir")


def atomic_write(path, content):
    """Write a str or bytes to path atomically (atomic_open)."""
    with atomic_open(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)


class DownloadError(ConnectionError):
    """A download that failed or stopped; the message says what to do (run again to resume, or where files go)."""


def download(url, dest, timeout=10.0, hint="", progress=True, check=None):
    """Fetch url to dest with a progress bar. The bytes go to dest.part first, and a partial .part is resumed with an
    HTTP Range request; dest gets its name only once the file is whole and check(part), if given, has not raised.
    Without a network it fails within `timeout` seconds, with `hint` (what to place where) in the message."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # nothing left to fetch: the .part is whole
            return _finish(part, dest, check)
        raise DownloadError(f"could not download {url}: HTTP {e.code}. {hint}".strip()) from None
    except (urllib.error.URLError, OSError, ValueError) as e:  # refused, unreachable, timed out, a bad address
        raise DownloadError(f"could not download {url}: {getattr(e, 'reason', e)}. {hint}".strip()) from None
    try:
        with response:
            if have and response.status != 206:
                have = 0  # the server ignored the range: start again
            total = have + int(response.headers.get("Content-Length") or 0)
            with open(part, "ab" if have else "wb") as f, tqdm(total=total or None, initial=have, unit="B",
                                                               unit_scale=True, desc=dest.name,
                                                               disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:  # the connection broke mid-file
        raise DownloadError(f"download of {url} broke off ({e}); run again to resume") from None
    if total and part.stat().st_size != total:
        raise DownloadError(f"download of {url} stopped at {part.stat().st_size} of {total} bytes; run again to "
                            "resume")
    return _finish(part, dest, check)


def _finish(part, dest, check):
    if check is not None:
        check(part)  # a file that fails keeps its .part name: nothing looks complete that is not
    os.replace(part, dest)
    return dest


def cached_arrays(kind, key_parts, records, build, cache_dir, version):
    """Arrays from `build()`, cached in cache_dir as {kind}-{key}.npz + .json. The key hashes what made them: the
    records' content, tokenizer and lengths. The JSON is written last, so a half-written cache is never used; one
    damaged later (emptied, cut, overwritten) is built anew, saying so. version: of the arrays' layout."""
    if cache_dir is None:
        return build()[0]
    h = hashlib.sha256(json.dumps([version, kind, key_parts]).encode())
    for r in records:
        h.update(json.dumps(r, sort_keys=True).encode())
    key = h.hexdigest()
    npz, meta = Path(cache_dir) / f"{kind}-{key[:16]}.npz", Path(cache_dir) / f"{kind}-{key[:16]}.json"
    if meta.is_file() and npz.is_file():
        where = meta
        try:  # an emptied, cut or overwritten cache is built anew, not a failure of every later run
            saved = json.loads(meta.read_text())
            if saved.get("key") == key:
                where = npz
                with np.load(npz, allow_pickle=False) as z:
                    arrays = dict(z)  # reads every array, so the zip's CRCs are checked
                if len(arrays["index"]) != saved["rows"]:
                    raise ValueError(f"{len(arrays['index'])} rows where {meta.name} says {saved['rows']}")
                return arrays
        except Exception as e:
            print(f"data: the cached {where} is damaged or unreadable ({type(e).__name__}: {e}); building it anew",
                  file=sys.stderr)
    arrays, info = build()
    with atomic_open(npz, "wb") as f:
        np.savez(f, **arrays)
    atomic_write(meta, json.dumps(dict(key=key, kind=kind, params=key_parts, rows=len(arrays["index"]), **info),
                                  indent=1) + "\n")
    print(f"data: prepared {len(arrays['index']):,} {kind} rows -> {npz} {info}")
    return arrays
