"""Checkpoints that survive crashes and full disks, and that load without running code from the file.

* Writes are atomic. A checkpoint file is written to ``<name>.tmp`` in its own folder, flushed and
  fsynced, then renamed over ``<name>`` (:func:`save_file`; ``sora-train`` gives its strategy
  :class:`sora.training.strategies.AtomicCheckpointIO`). A folder checkpoint (DeepSpeed ZeRO, FSDP2's torch distributed checkpoint) is
  written by every rank into ``<name>.tmp/``; after a barrier rank 0 moves the previous folder to
  ``<name>.old``, renames the new one into place and deletes the old (:func:`atomic_folder`). A failed
  write (a full disk: ``ENOSPC``) removes the temporary and raises :class:`CheckpointError`, one line
  naming the file and the reason; the previous checkpoint is untouched.
* :func:`problem` finds a truncated or corrupt checkpoint (a ``.ckpt`` is a zip archive: every member's
  CRC is checked; a folder: its index and the size of every shard), and :func:`resolve_last` picks the
  newest intact checkpoint of a run (``last.ckpt``, then the periodic ones), naming each one skipped.
* Reads never unpickle code: :func:`load_checkpoint_file` is ``torch.load(weights_only=True)``;
  :func:`safe_loading` forces it on the ``torch.load`` calls inside DeepSpeed (which asks for
  ``weights_only=False``), allowing only DeepSpeed's own data classes; :func:`check_dcp_metadata`
  reads a distributed checkpoint's pickled ``.metadata`` with an unpickler that knows only its classes
  before torch unpickles it.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read: one line, ``<path>: <reason>``."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the OS can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _save_failed(path: Path, e: BaseException) -> CheckpointError:
    reason = (e.strerror or os.strerror(e.errno)) if isinstance(e, OSError) and e.errno else _line(e)
    before = (f"the previous {path.name} is intact" if path.exists()
              else "the earlier checkpoints in its folder are untouched")
    hint = "; free some space, then resume with ckpt_path=last" if getattr(e, "errno", None) == errno.ENOSPC else ""
    return CheckpointError(path, f"cannot write this checkpoint: {reason}; {before}{hint}")


# -- writing -----------------------------------------------------------------------------------------
def save_file(checkpoint: dict, path) -> None:
    """``torch.save`` to ``<path>.tmp``, fsync, rename over ``path``; :class:`CheckpointError` on failure."""
    import io

    import torch

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)  # as Lightning's own save: the bytes first, then one write
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _save_failed(path, e) from e
    _fsync_dir(path.parent)


@contextmanager
def atomic_folder(strategy, path):
    """Yield ``<path>.tmp`` for every rank of ``strategy`` to write a folder checkpoint into, then swap
    it in for ``path`` (rank 0, between barriers). Between its two renames, ``path`` is briefly
    missing while ``<path>.old`` is whole: :func:`resolve_last` then takes the newest periodic one."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if strategy.is_global_zero:
        _remove(tmp)  # a leftover of an interrupted save
    strategy.barrier("sora_checkpoint_start")
    try:
        yield tmp
    except Exception as e:  # noqa: BLE001 - DeepSpeed / torch's writers report a full disk as RuntimeError
        if strategy.is_global_zero:
            _remove(tmp)
        raise _save_failed(path, e) from e
    strategy.barrier("sora_checkpoint_written")
    if strategy.is_global_zero:
        _remove(old)
        if path.exists() or path.is_symlink():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        _remove(old)
    strategy.barrier("sora_checkpoint_renamed")


# -- checking ----------------------------------------------------------------------------------------
def _zip_problem(path: Path, crc: bool = True) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip() if crc else None
    except zipfile.BadZipFile:
        return "truncated, corrupt or not a torch checkpoint (not a complete zip archive, as torch.save writes)"
    except OSError as e:
        return f"unreadable ({_line(e)})"
    return f"corrupt (member {bad} fails its CRC check)" if bad else None


_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "TensorStorageMetadata", "StorageMeta",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Rebuilds a torch distributed checkpoint's ``.metadata`` (data classes, sizes, dtypes) and nothing else."""

    def find_class(self, module: str, name: str):
        import torch

        if name in _DCP_CLASSES.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of a distributed checkpoint's metadata")


def _dcp_metadata(folder: Path):
    """(metadata, None), or (None, the reason it is refused or unreadable)."""
    try:
        with open(folder / ".metadata", "rb") as f:
            return _DCPMetadataUnpickler(f).load(), None
    except pickle.UnpicklingError as e:
        return None, f"refused to load its .metadata: {_line(e)}"
    except Exception as e:  # noqa: BLE001 - truncated or not a pickle
        return None, f".metadata is truncated or corrupt ({type(e).__name__}: {_line(e)})"


def check_dcp_metadata(path) -> None:
    """Refuse distributed-checkpoint folder ``path`` (one :class:`CheckpointError` line) unless its
    ``.metadata`` unpickles with only its own classes: torch reads that file with ``pickle.load``."""
    reason = _dcp_metadata(Path(path))[1] if (Path(path) / ".metadata").is_file() else None
    if reason:
        raise CheckpointError(path, reason)


def _folder_problem(path: Path) -> str | None:
    if (path / "latest").is_file():  # DeepSpeed: 'latest' names the tag folder of per-rank shards
        shards = sorted((path / (path / "latest").read_text().strip()).glob("*.pt"))
        if not any(p.name.endswith("model_states.pt") for p in shards):
            return "incomplete DeepSpeed checkpoint (no *model_states.pt shard under the tag named by 'latest')"
        for shard in shards:  # each shard's zip index (truncation); no CRC pass: every rank would read them all
            with open(shard, "rb") as f:
                legacy = f.read(1) == b"\x80"  # torch's pre-zip format (checkpoint_serialization: false)
            reason = None if legacy else _zip_problem(shard, crc=False)
            if reason:
                return f"{shard.name}: {reason}"
        return None
    if (path / ".metadata").is_file():  # torch distributed checkpoint: each shard as long as its index says
        metadata, reason = _dcp_metadata(path)
        if reason:
            return reason
        ends: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for name, end in ends.items():
            size = (path / name).stat().st_size if (path / name).is_file() else 0
            if size < end:
                return f"{name} is truncated or missing ({size} of at least {end} bytes)"
        return _zip_problem(path / "meta.pt") if (path / "meta.pt").exists() else None
    return "a folder that is neither a DeepSpeed checkpoint ('latest') nor a distributed checkpoint ('.metadata')"


def problem(path) -> str | None:
    """Why checkpoint ``path`` (a file or a folder) cannot be resumed from, or None when it is intact."""
    path = Path(path)
    if path.is_dir():
        return _folder_problem(path)
    if not path.is_file():
        return "no such file or folder"
    return _zip_problem(path)


def intact(path) -> bool:
    return problem(path) is None


def _step(path: Path) -> int:
    found = re.search(r"step=(\d+)", path.name)
    return int(found.group(1)) if found else -1


def resolve_last(folder) -> Path | None:
    """The newest intact checkpoint in ``folder``: ``last.ckpt``, else the others by step (then time),
    newest first; each corrupt one skipped is named in a warning. None when there is none at all;
    :class:`CheckpointError` when every one is damaged."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    others = [p for p in folder.glob("*.ckpt")  # not a non-finite stop's (sora.training.guards): only when named
              if p.name != "last.ckpt" and not p.name.startswith("nonfinite-") and p.exists()]
    others.sort(key=lambda p: (_step(p), p.stat().st_mtime), reverse=True)
    candidates = ([folder / "last.ckpt"] if (folder / "last.ckpt").exists() else []) + others
    skipped = []
    for path in candidates:
        reason = problem(path)
        if reason is None:
            if skipped:
                log.warning("resuming from %s, the newest intact checkpoint", path)
            return path
        log.warning("skipping checkpoint %s: %s", path, reason)
        skipped.append(f"{path.name}: {reason}")
    if skipped:
        raise CheckpointError(folder, "no intact checkpoint: " + "; ".join(skipped))
    return None


# -- reading -----------------------------------------------------------------------------------------
def _refused(path, e: BaseException) -> CheckpointError:
    import torch

    try:  # every global the file's pickle names (a scan: nothing is run)
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a folder, a legacy file: the one torch named
        names = []
    names = names or sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e)))) or [_line(e)[:120]]
    return CheckpointError(path, f"refused to load: it holds pickled objects other than tensors and plain data "
                                 f"({', '.join(names)}); checkpoints are read with torch.load(weights_only=True), "
                                 f"which runs no code from the file")


def load_checkpoint_file(path, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)``; a refused, truncated or corrupt file is one
    :class:`CheckpointError` line naming it."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(path, "no such checkpoint") from None
    except Exception as e:  # noqa: BLE001 - classified below
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e):
            raise _refused(path, e) from None
        reason = problem(path) if Path(path).is_file() else None
        raise CheckpointError(path, reason or f"unreadable ({type(e).__name__}: {_line(e)})") from None


@contextmanager
def safe_loading(path, allowed=()):
    """Every ``torch.load`` inside runs with ``weights_only=True`` (torch's
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), even where a library asks otherwise; ``allowed``: the classes
    (beyond tensors and plain data) it may rebuild. A refusal is a :class:`CheckpointError` naming ``path``."""
    import torch

    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    except pickle.UnpicklingError as e:
        raise _refused(path, e) from None
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def deepspeed_globals() -> list:
    """The data classes DeepSpeed pickles into its optimizer shards (plain attributes, no code): the ZeRO
    stage enum, the loss scalers and ZeRO-1/2's ``fragment_address`` (two ints per parameter slice,
    in ``param_slice_mappings``)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
