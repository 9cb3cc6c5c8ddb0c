"""Prepared stores behind a URL: HTTP(S), the object stores fsspec handles, WebDataset ``pipe:``.

An address names a part folder (the one holding ``manifest.jsonl``) or a folder of
``part-*-of-*`` folders, as a local path (``tricoclr.data.store``) or as a URL:

- a URL that fsspec opens (``http(s)://``, ``file://``, ``memory://``, ``s3://``, ``gs://``, ...):
  a file of a part is the part's URL + ``/`` + its name (``manifest.jsonl``,
  ``shards/shard-000000.tar``);
- ``pipe:`` + a shell command in which ``{name}`` stands for a file of the part, e.g.
  ``pipe:aws s3 cp s3://bucket/store/{name} -``: the command with ``{name}`` replaced by the
  file's name writes that file to its standard output. This is WebDataset's ``pipe:``
  convention; WebDataset's ``gopen`` runs the command through the shell.

WebDataset's brace ranges name several parts at once (``.../part-{00000..00007}-of-00008``); a
URL whose filesystem lists folders (file, memory, s3, gcs; HTTP where the server serves an index
page) may also name the folder above the parts. The manifests list the shards, so a URL store
is never listed beyond that.

Metadata files are read whole (as local stores read them); shards are streamed, never copied:
fsspec opens HTTP(S) as one sequential GET (``block_size=0``: no range requests, so any server
works) and other schemes with their own buffered reader; ``pipe:`` goes through WebDataset's
``gopen``, the route its own shard URLs take.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

PIPE_PREFIX = "pipe:"
NAME_FIELD = "{name}"
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_PART_NAME_IN_TEMPLATE = re.compile(r"([^/\s'\"{}]+)/\{name\}")

ErrorHandler = Callable[[Exception], bool]  # WebDataset's: True to go on, False to stop


def is_url(address) -> bool:
    """Whether a store address is a URL or a ``pipe:`` command (else a local path)."""
    return isinstance(address, str) and (address.startswith(PIPE_PREFIX) or bool(_URL_SCHEME.match(address)))


def expand_braces(address: str) -> list[str]:
    """WebDataset's brace expansion (``part-{00000..00002}-of-00003``); ``{name}`` is kept."""
    import braceexpand

    return list(braceexpand.braceexpand(address))


class RemotePart:
    """One part of a store behind a URL or a ``pipe:`` template; picklable (plain strings).

    ``name`` is the part folder's name (the last path component, the one before ``/{name}`` in a
    template), as a local store names its parts.
    """

    def __init__(self, base: str):
        if base.startswith(PIPE_PREFIX):
            if NAME_FIELD not in base:
                raise ValueError(
                    f"{base}: a pipe: store address needs {NAME_FIELD} where a file of the store goes, e.g. "
                    f"'pipe:aws s3 cp s3://bucket/store/{NAME_FIELD} -' (docs/url_stores.md)"
                )
            found = _PART_NAME_IN_TEMPLATE.search(base)
            self.name = found[1] if found else "store"
            self.base = base
        else:
            self.base = base.rstrip("/")
            self.name = self.base.rsplit("/", 1)[-1]

    def __repr__(self) -> str:
        return f"RemotePart({self.base!r})"

    def address(self, relative: str) -> str:
        """The URL (or command) of the part's file ``relative`` ('manifest.jsonl', 'shards/x.tar')."""
        if self.base.startswith(PIPE_PREFIX):
            return self.base.replace(NAME_FIELD, relative)
        return f"{self.base}/{relative}"

    def read(self, relative: str) -> bytes:
        """The whole file; FileNotFoundError naming its address when it is missing."""
        return read_file(self.address(relative))

    def has(self, relative: str) -> bool:
        """Whether the file exists (fsspec URLs; a ``pipe:`` part is taken to have it: only running
        the command could tell, and reading it then says what failed)."""
        if self.base.startswith(PIPE_PREFIX):
            return True
        import fsspec

        filesystem, path = fsspec.core.url_to_fs(self.address(relative))
        return filesystem.exists(path)

    def why_missing(self, relative: str) -> str:
        """Why the file cannot be opened (the HTTP status, the connection error...), for messages."""
        try:
            open_stream(self.address(relative)).close()
        except OSError as error:  # FileNotFoundError included
            return str(error)
        return f"{self.address(relative)}: found now (it appeared meanwhile)"

    def subparts(self, pattern: str) -> list[RemotePart]:
        """Folders below this address whose names match ``pattern``, where the filesystem can list
        (an empty list where it cannot, e.g. an HTTP server without index pages)."""
        if self.base.startswith(PIPE_PREFIX):
            return []
        import fsspec

        filesystem, path = fsspec.core.url_to_fs(self.base)
        try:
            found = filesystem.glob(f"{path.rstrip('/')}/{pattern}")
        except (OSError, NotImplementedError, ValueError):
            return []
        return [RemotePart(filesystem.unstrip_protocol(p.rstrip("/"))) for p in sorted(found)]


def _is_http(address: str) -> bool:
    return address.startswith(("http://", "https://"))


def _http_options() -> dict:
    """fsspec HTTP options for a streamed shard: one plain GET (``block_size=0``: no range
    requests, so any server works), and no limit on the whole transfer: aiohttp's default gives a
    request 5 minutes in all, less than a slow reader may take over one shard. A connection
    that does not open in 30 s, or a server that sends nothing for 5 minutes while asked, fails."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
    return {"block_size": 0, "client_kwargs": {"timeout": timeout}}


def open_stream(address: str):
    """A binary, sequentially read stream of one file: a local path, an fsspec URL or a ``pipe:``
    command. Raises FileNotFoundError naming the address when it is missing (HTTP 404, no such
    object), OSError naming it when it cannot be reached; a ``pipe:`` command's failure shows as an
    OSError (its exit status) on reading or closing."""
    if address.startswith(PIPE_PREFIX):
        import webdataset as wds

        return wds.gopen(address, "rb")
    if not is_url(address):
        return open(address, "rb")
    import fsspec

    options = _http_options() if _is_http(address) else {}
    try:
        return fsspec.open(address, "rb", **options).open()
    except FileNotFoundError as error:  # fsspec's HTTP turns every failure into this; its cause says which
        cause = error.__cause__ or error.__context__
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        raise FileNotFoundError(f"{address}: not found or not reachable{detail}") from error
    except ImportError:
        raise
    except Exception as error:  # aiohttp's and the object stores' own errors: name the address
        raise OSError(f"{address}: cannot be read: {type(error).__name__}: {error}") from error


def read_file(address: str) -> bytes:
    """The whole content of one (metadata) file; FileNotFoundError naming the address when it is
    missing or, for ``pipe:``, when the command fails (the two cannot be told apart)."""
    stream = open_stream(address)
    try:
        with stream:
            return stream.read()
    except FileNotFoundError:
        raise
    except OSError as error:
        if address.startswith(PIPE_PREFIX):  # WebDataset's Pipe raises on a non-zero exit status
            raise FileNotFoundError(
                f"{address}: the command exited with status {getattr(stream, 'status', '?')}: "
                "the file is missing or the command cannot fetch it"
            ) from error
        raise


def _close(stream, address: str) -> Exception | None:
    """Close a shard stream; the error a ``pipe:`` command's exit status gives, if any."""
    try:
        stream.close()
    except OSError as error:
        return OSError(f"{address}: {error}")
    return None


def _opened_shards(addresses: Iterable[str], handler: ErrorHandler) -> Iterator[dict]:
    """WebDataset's url_opener over ``open_stream``: each shard opened when reached, closed after."""
    for address in addresses:
        try:
            stream = open_stream(address)
        except Exception as error:
            if handler(error):
                continue
            return
        try:
            yield {"url": address, "stream": stream}
        except GeneratorExit:  # the reader stopped inside this shard: nothing left to report
            _close(stream, address)
            raise
        error = _close(stream, address)
        if error is not None and not handler(error):
            return


def shard_samples(
    addresses: Iterable[str], handler: ErrorHandler | None = None, select_files: Callable[[str], bool] | None = None
) -> Iterator[dict]:
    """Raw WebDataset sample dicts of the shards, in order, each shard streamed once.

    WebDataset's ``tarfile_samples`` with the opener swapped for ``open_stream`` (WebDataset's own
    opens neither ``memory://`` nor the object stores through fsspec). ``handler`` decides on each
    error (default: raise).
    """
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import group_by_keys, tar_file_expander

    handler = handler or reraise_exception
    files = tar_file_expander(_opened_shards(addresses, handler), handler=handler, select_files=select_files)
    return group_by_keys(files, handler=handler)
