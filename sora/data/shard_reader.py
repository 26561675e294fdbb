"""Reading webdataset shards with bad data in mind (used by :class:`sora.data.streams.ShardClipStream`).

:func:`read_shards` yields the samples of a list of shards as webdataset groups them (consecutive
members of one key: ``{"__key__", "__url__", ext: bytes}``), and reports every fault to an
``error(kind, what, reason)`` callback instead of raising, then goes on:

* a shard that cannot be opened (deleted, unreachable): the shard is skipped;
* corrupt tar data: read with ``ignore_zeros``, blocks that are not a tar header are skipped up to
  the next good one (plain ``tarfile`` would end the shard there without a word); the samples
  around it are kept (the decoder rejects one that lost its video);
* a read error or a truncated shard: the rest of the shard is lost, and the sample whose member
  was being read when it happened; a shard cut exactly between members is named too (it lacks the
  end-of-archive marker);
* a duplicate member in a sample: the first is used.

Members that hold pickles (:data:`PICKLE_EXTS`: webdataset's decoders would unpickle them) are
dropped unread, with one warning per shard: nothing from a shard is ever unpickled.
"""

from __future__ import annotations

import logging
import re
import tarfile
from typing import Callable, Iterator

import webdataset as wds

log = logging.getLogger("sora.data.pipeline")  # all data warnings under one name
PICKLE_EXTS = {"pyd", "pickle", "pkl", "pt", "pth"}
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (``__key__`` ...), skipped as it does


class _Header(tarfile.TarInfo):
    """Tar headers that count the corrupt ones ``ignore_zeros`` skips (``tar.garbage``) and note whether
    the last blocks read were end-of-archive zeros (``tar.ended``; if not: truncated). An extended
    (pax, GNU) header followed by a corrupt one is skipped with it: ``tarfile`` would end the shard."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            header = super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.ended = True
            raise
        except tarfile.InvalidHeaderError:
            tar.garbage = getattr(tar, "garbage", 0) + 1
            raise
        except tarfile.SubsequentHeaderError as e:  # the member header after a pax header is corrupt
            tar.garbage, tar.ended = getattr(tar, "garbage", 0) + 1, False
            raise tarfile.InvalidHeaderError(str(e)) from None  # so ignore_zeros skips on
        tar.ended = False
        return header


def _gap(tar, error, url: str, before: str | None, after: str | None) -> bool:
    """Report the corrupt blocks skipped since the last member, if any."""
    if not getattr(tar, "garbage", 0):
        return False
    where = (f" after member {before}" if before else " at its start") + (f", before member {after}" if after
                                                                         else ", to its end")
    error("shard", f"corrupt tar data in {url}{where}", f"{tar.garbage} corrupt tar block(s) skipped; a member "
          "there is lost")
    tar.garbage = 0
    return True


def read_shards(urls: list[str], error: Callable[[str, str, object], None]) -> Iterator[dict]:
    """The samples of ``urls`` in turn; faults go to ``error("shard", what, reason)`` (see the module doc)."""
    for url in urls:
        try:
            stream = wds.gopen(url)
        except Exception as e:  # noqa: BLE001 - vanished, unreachable, ...
            error("shard", f"shard {url}", e)
            continue
        sample, last, reading, refused = None, None, False, []
        try:
            with stream, tarfile.open(fileobj=stream, mode="r|*", ignore_zeros=True, tarinfo=_Header) as tar:
                for info in tar:
                    _gap(tar, error, url, last, info.name)
                    prefix, ext = wds.tariterators.base_plus_ext(info.name)
                    if not info.isreg() or prefix is None or _META.match(info.name):
                        continue
                    last, ext = info.name, ext.lower()
                    if ext.rsplit(".", 1)[-1] in PICKLE_EXTS:
                        refused.append(info.name)  # never read
                        continue
                    if sample is None or sample["__key__"] != prefix:
                        if sample is not None:
                            yield sample
                        sample = {"__key__": prefix, "__url__": url}
                    reading = True
                    data = tar.extractfile(info).read()
                    reading = False
                    if ext in sample:
                        error("shard", f"member {info.name} of {url}", "a duplicate; the first one is used")
                    else:
                        sample[ext] = data
                if not _gap(tar, error, url, last, None) and not getattr(tar, "ended", False):
                    error("shard", f"the end of {url} after member {last}",
                          "truncated: no end-of-archive marker (its last sample is used, it may lack a member)")
        except Exception as e:  # noqa: BLE001 - a read error ends the shard
            if last is None:
                error("shard", f"shard {url}", e)
            elif reading:
                error("shard", f"sample {sample['__key__']} and the rest of {url} from member {last}", e)
                sample = None  # it lost a member
            else:
                error("shard", f"the rest of {url} after member {last}", e)
        if refused:
            log.warning("data: %s: %d member(s) holding pickles dropped unread (%s): shard data is never unpickled",
                        url, len(refused), ", ".join(refused[:3]) + (", ..." if len(refused) > 3 else ""))
        if sample is not None:
            yield sample


_BINARY = re.compile("[\x00-\x06\x0e-\x1a\x1c-\x1f\x7f]")  # controls that ``file`` does not take for text


def caption_text(data: bytes, what: str = ".txt") -> str:
    """A caption's bytes as text: UTF-8 without binary control characters (NUL ...), else raise."""
    try:
        out = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"the caption {what} is not UTF-8 text") from None
    if _BINARY.search(out):
        raise ValueError(f"the caption {what} holds binary control characters: not text")
    return out
