"""Reading WebDataset tar shards from anywhere webdataset can open, sample by sample, from any offset.

The bytes come from ``webdataset.gopen``: local paths and ``file:`` URLs, ``http(s)://`` (and sftp,
ftps, scp) through ``curl``, ``gs://`` through ``gsutil``, ``ais://`` through ``ais``, and
``pipe:CMD`` — whatever ``CMD`` writes to stdout (``pipe:aws s3 cp s3://bucket/a.tar -``). The tar
stream is expanded by webdataset's ``tar_file_expander`` and its members grouped into samples by
``group_by_keys`` (``<key>.<ext>``, the key being the member path up to the first dot of its base
name). mdm adds what webdataset does not have:

- **exact resume**: :func:`iter_tar_samples` starts at a sample offset. Members of earlier samples are
  passed over by name without being copied out (a non-seekable stream still reads over their bytes);
- **failures as data**: a shard that cannot be opened, that ends inside a member, or whose reader
  command exits with an error raises :class:`ShardReadError`, whose ``reason`` streams count
  (``unreadable_tar``: not one byte could be read; ``truncated_tar``: the shard broke off after some).

Globs and directories only make sense on a file system, so :func:`expand_shards` applies them to
local paths only; URLs get webdataset's brace expansion (``shard-{000000..000099}.tar``).
"""

from __future__ import annotations

import glob
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

__all__ = [
    "ShardReadError",
    "TruncatedShard",
    "UnreadableShard",
    "expand_shards",
    "is_url",
    "iter_tar_samples",
    "shard_name",
]


class ShardReadError(IOError):
    """A shard could not be read (to its end); ``reason`` names the kind of failure for skip counts."""

    reason = "unreadable_tar"


class UnreadableShard(ShardReadError):
    """Not one byte of the shard could be read: missing file or object, HTTP error, failing command."""

    reason = "unreadable_tar"


class TruncatedShard(ShardReadError):
    """A shard ends in the middle of a member, or its transfer failed part-way (a partial copy)."""

    reason = "truncated_tar"


def _scheme(spec: str) -> str:
    scheme = urlparse(spec).scheme
    return scheme if len(scheme) > 1 else ""  # "C:" is a drive letter, not a scheme


def is_url(spec: str) -> bool:
    """True for shard specs that are read through a URL handler (everything but paths and ``file:``)."""
    return _scheme(spec) not in ("", "file")


def _local_path(spec: str) -> str:
    return url2pathname(urlparse(spec).path) if _scheme(spec) == "file" else spec


def _check_scheme(url: str, where: str) -> None:
    from webdataset.gopen import gopen_schemes

    scheme = _scheme(url)
    if scheme not in gopen_schemes:
        known = ", ".join(sorted(f"{s}:" for s in gopen_schemes if not s.startswith("_")))
        hint = f"; e.g. pipe:aws s3 cp {url} -" if scheme == "s3" else ""
        raise ValueError(
            f"{where}: shard URL {url!r}: webdataset opens no {scheme}: URLs (it opens local paths, "
            f"file:, {known}); read it through a command with pipe:CMD{hint}"
        )


def expand_shards(specs: list[str], where: str) -> list[str]:
    """Shards named by ``specs``, in order: URLs and paths after brace expansion, then, for local paths
    only, directories (all ``*.tar`` inside) and globs (``*``, ``?``, ``[..]``, ``**``), sorted per item.

    Args:
        specs: paths, ``file:`` URLs, URLs webdataset opens, ``pipe:CMD`` (webdataset's ``::`` lists and
            ``${WDS_VAR}`` substitution apply).
        where: what to call the specs in errors (``data.image.sources[0]``).

    Raises:
        FileNotFoundError: a local spec matches no file.
        ValueError: a URL whose scheme webdataset cannot open.
    """
    from webdataset.shardlists import expand_urls

    out: list[str] = []
    for spec in specs:
        for item in expand_urls(spec):
            if is_url(item):
                _check_scheme(item, where)
                out.append(item)
                continue
            path = _local_path(item)
            if Path(path).is_dir():
                found = sorted(str(s) for s in Path(path).glob("*.tar"))
            elif any(c in path for c in "*?["):
                found = sorted(glob.glob(path, recursive=True))
            else:
                found = [path] if Path(path).exists() else []
            if not found:
                raise FileNotFoundError(f"{where}: shard spec {item!r} matches no file")
            out += found
    return out


def shard_name(spec: str) -> str:
    """The file name of a shard: the base name of its path, or for ``pipe:CMD`` of the last argument
    that names a ``.tar`` (``pipe:aws s3 cp s3://b/shard-000007.tar -`` → ``shard-000007.tar``).

    Raises:
        ValueError: a ``pipe:`` command that names no ``.tar``.
    """
    if _scheme(spec) == "pipe":
        names = [Path(urlparse(a).path).name for a in spec[len("pipe:") :].split()]
        tars = [n for n in names if ".tar" in n]
        if not tars:
            raise ValueError(f"{spec!r}: cannot tell the shard's file name (no argument names a .tar)")
        return tars[-1]
    return Path(urlparse(spec).path if is_url(spec) else _local_path(spec)).name


class _CountingReader:
    """A read-only stream that counts the bytes it delivered (0 bytes = the shard was unreadable) and
    keeps the first and the last kilobyte, to tell a complete tar from one cut at a member boundary."""

    def __init__(self, stream: Any, url: str) -> None:
        self.stream, self.url, self.nbytes = stream, url, 0
        self.head, self.tail = b"", b""

    def read(self, *args: Any) -> bytes:
        data = self.stream.read(*args)
        self.nbytes += len(data)
        if len(self.head) < 1024:
            self.head += data[: 1024 - len(self.head)]
        self.tail = (self.tail + data)[-1024:]
        return data

    def ends_like_a_tar(self) -> bool:
        """False for an uncompressed POSIX tar whose stream stops without the end-of-archive marker.

        Two zero blocks close a tar. tarfile reads a stream cut exactly between members as a complete
        archive (it cannot tell), so we read to the end and look at the last 1024 bytes. Compressed and
        pre-POSIX (no ``ustar`` magic) shards are not judged.
        """
        while self.read(1 << 16):
            pass
        if self.head[257:262] != b"ustar":
            return True
        return len(self.tail) == 1024 and not any(self.tail)

    def __repr__(self) -> str:
        return self.url


class _FromSample:
    """``select_files`` predicate: True for the members of sample ``start`` and after.

    Counts samples with webdataset's own key function, so its numbering is that of ``group_by_keys``.
    """

    def __init__(self, start: int) -> None:
        self.start, self.index, self.key = start, -1, None

    def __call__(self, fname: str) -> bool:
        from webdataset.tariterators import base_plus_ext

        key, _ = base_plus_ext(fname)
        if key is None:  # no extension: group_by_keys drops the member too
            return False
        if key != self.key:
            self.index, self.key = self.index + 1, key
        return self.index >= self.start


def _message(e: BaseException | None, stream: Any = None) -> str:
    """The cause in a sentence: webdataset appends streams to ``args`` and `` @ <stream>`` to messages,
    and a failing ``pipe:``/curl reader says ``(<Popen args>): exit N``; we say which status."""
    if e is None:
        first = "empty"
    else:
        first = str(e.args[0]) if e.args else type(e).__name__
    first = first.split(" @ ")[0]
    status = getattr(stream, "status", None)
    if status in (None, 0):
        return first
    if first.startswith(f"{getattr(stream, 'args', None)}:"):
        return f"the reader command exited with status {status}"
    return f"{first}; the reader command exited with status {status}"


def _close_quietly(stream: Any) -> None:
    # after an early stop a reader command dies of SIGPIPE (or curl exits 23): not an error of the shard
    try:
        stream.close()
    except Exception:
        pass


def _failure(url: str, index: int, counted: _CountingReader, error: BaseException | None, stream: Any):
    if counted.nbytes == 0:
        return UnreadableShard(f"{url}: cannot read the shard ({_message(error, stream)})")
    why = _message(error, stream) if error is not None else "no end-of-archive marker"
    return TruncatedShard(f"{url}: truncated or corrupt tar after sample {index} ({why})")


def iter_tar_samples(url: str | Path, start: int = 0) -> Iterator[tuple[int, dict[str, bytes]]]:
    """``(offset, sample)`` of a shard from sample ``start`` on; ``sample`` is ``{"__key__": key, ext: bytes}``.

    Args:
        url: a local path or any URL ``webdataset.gopen`` opens (see the module docstring).
        start: the offset of the first sample to yield.

    Raises:
        UnreadableShard: nothing could be read (no such file, HTTP error, failing command).
        TruncatedShard: the shard broke off; the samples before the break have been yielded.
    """
    from webdataset.gopen import Pipe, gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    url = str(url)
    try:
        stream = gopen(url, "rb")
    except Exception as e:  # OSError for files, ValueError / OSError from handlers and Popen
        raise UnreadableShard(f"{url}: cannot open the shard ({_message(e)})") from None
    # a Pipe raises on read once its command has failed, dropping the bytes it got; read the command's
    # stdout directly and ask for the exit status when closing
    counted = _CountingReader(stream.stream if isinstance(stream, Pipe) else stream, url)
    files = tar_file_expander([{"url": url, "stream": counted}], select_files=_FromSample(start))
    index, error, complete = start, None, False
    try:
        try:
            for sample in group_by_keys(files):
                yield index, {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
                index += 1
            complete = counted.ends_like_a_tar()
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            error = e
        try:
            stream.close()  # a reader command reports its exit status here
        except OSError as e:
            error = error or e
        if error is not None or not complete:
            raise _failure(url, index, counted, error, stream)
    finally:
        _close_quietly(stream)
