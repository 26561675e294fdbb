"""Fuzz harness for the media readers: runs one call on mutated bytes in an isolated worker, checks it.

Used by tests/test_media_fuzz.py, which holds the seed files, the mutations and the hypothesis
strategies (a fixed-seed slice in ``make test``, >= 10,000 inputs with ``make fuzz``).  Every
call (``CALLS``: probe_av / read_av / read_audio on bytes or a path, the training-time windowed
read, the shard worker ``sora.data.shards.process`` storing or re-encoding) runs in a long-lived
spawned worker process with a memory limit; the parent waits ``timeout`` seconds per call.
Outcomes: ``ok`` (output checked well formed), ``media_error`` (MediaError whose message starts
with the source name), or a failure: ``fail`` (any other exception, or a shard skip reason
``"TypeName: ..."``), ``bad_output``, ``hang`` (worker killed and restarted), ``crash`` (the
worker died).  Each failure kind keeps up to 3 reproducers (input + json) per seed file under
the output folder; ``python tools/fuzz_media.py REPRO.json`` replays one in-process.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

CALLS = ("probe_bytes", "probe_path", "read_bytes", "read_path", "read_window", "read_audio",
         "shard_store", "shard_reencode")
FAILURES = ("fail", "bad_output", "hang", "crash")

# ----------------------------------------------------------------------------- the worker: one call, checked


class BadOutput(Exception):
    """A call returned, but its output breaks the documented contract."""


def _need(ok: bool, what) -> None:
    if not ok:
        raise BadOutput(str(what))


def _check_info(i) -> None:
    d = i if isinstance(i, dict) else i.to_dict()
    _need(all(isinstance(d[k], int) and d[k] > 0 for k in ("width", "height")), d)
    for k in ("fps", "duration", "audio_duration", "audio_offset"):
        _need(math.isfinite(d[k]) and (k == "audio_offset" or d[k] >= 0), f"{k}={d[k]}")
    for k in ("num_frames", "sample_rate", "channels"):
        _need(isinstance(d[k], int) and d[k] >= 0, f"{k}={d[k]}")
    _need(d["has_audio"] or d["sample_rate"] == d["channels"] == 0, d)


def _check_audio(audio, mask, channels, n=None) -> None:
    _need(audio.dtype == np.float32 and audio.ndim == 2 and audio.shape[0] == channels, (audio.dtype, audio.shape))
    _need(np.isfinite(audio).all() and np.abs(audio).max(initial=0) <= 1.0, "audio not finite / out of [-1, 1]")
    _need(mask is None or (mask.dtype == bool and mask.shape == audio.shape[1:]), f"mask {getattr(mask, 'shape', 0)}")
    _need(n is None or audio.shape[1] == n, f"{audio.shape[1]} audio samples, expected {n}")


def _check_clip(clip, p: dict) -> None:
    _check_info(clip.info)
    f = clip.frames
    h, w = p.get("size") or (clip.info.height, clip.info.width)
    _need(f.dtype == np.uint8 and f.ndim == 4 and f.shape[1:] == (h, w, 3), f"frames {f.dtype} {f.shape}, want {h}x{w}")
    if p.get("fps") and p.get("duration") is not None:
        _need(len(f) <= math.floor(p["duration"] * p["fps"] + 1e-6), f"{len(f)} frames for {p}")
    n = None if p.get("duration") is None else round(p["duration"] * 16000)
    _check_audio(clip.audio, clip.audio_mask, p.get("channels", 1), n)


def _where(tb) -> str:
    """The innermost frame in the sora package (else the innermost one) as "sora/x.py:LINE in f"."""
    import sora

    root = os.path.dirname(os.path.dirname(os.path.abspath(sora.__file__))) + os.sep
    frames = traceback.extract_tb(tb)
    f = ([f for f in frames if os.path.abspath(f.filename).startswith(root + "sora" + os.sep)] or frames or [None])[-1]
    return "?" if f is None else f"{os.path.abspath(f.filename).removeprefix(root)}:{f.lineno} in {f.name}"


def _fail(e: BaseException, status: str = "fail", label: str | None = None) -> tuple:
    """(status, kind = "<label or exception type>@<innermost sora frame>", message, traceback)."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-6))
    return status, f"{label or type(e).__name__}@{_where(e.__traceback__)}", " ".join(str(e).split())[:300], tb


def _process(shards, job, opts, trace: bool = False):
    """shards.process -> (skip reason, probe dicts of the samples[, the exception it swallowed]).
    With `trace`, a trace hook on process()'s frame catches the exception it formats into a reason."""
    seen = []

    def hook(frame, event, arg):
        if event == "call":
            return hook if frame.f_code is shards.process.__code__ else None
        if event == "exception" and not isinstance(arg[1], shards.MediaError):
            seen.append(arg[1])
        return hook

    sys.settrace(hook if trace else None)
    try:
        res = shards.process(job, opts)
    finally:
        sys.settrace(None)
    _, samples, reason = res
    return reason, [meta for *_, meta in samples], seen[-1] if seen else None


def run_call(call: str, data: bytes, ext: str, params: dict, tmp: str) -> tuple:
    """(status, kind, message, traceback) of one call, in this process."""
    from sora.data import shards
    from sora.media import MediaError, probe_av, read_audio, read_av

    path = os.path.join(tmp, f"input.{ext}")
    with open(path, "wb") as fh:
        fh.write(data)
    src = path if call.endswith("_path") or call.startswith("shard") else data
    name = path if src is path else "<bytes>"
    channels = params.get("channels", 1)
    try:
        if call.startswith("probe"):
            _check_info(probe_av(src))
        elif call in ("read_bytes", "read_path"):
            _check_clip(read_av(src), {})
        elif call == "read_window":
            _check_clip(read_av(src, threads=1, **params), params)
        elif call == "read_audio":
            audio, info = read_audio(src, channels=channels)
            _check_audio(audio, None, channels)
            _need(info.duration >= 0 and info.sample_rate >= 0 and info.channels >= 0, info)
        else:
            job = shards.Job("fuzz", f"input.{ext}", "", path=path, ext=ext)
            opts = shards.Options(max_side=32) if call == "shard_reencode" else shards.Options()
            reason, metas, _ = _process(shards, job, opts)
            if reason is not None and re.match(r"[A-Z][\w.]*: ", reason):  # an unexpected exception, formatted
                err = _process(shards, job, opts, trace=True)[2]
                return _fail(err) if err is not None else ("fail", f"{reason.split(':')[0]}@?", reason[:300], "")
            for meta in metas:
                _check_info(meta)
    except MediaError as e:
        if str(e).startswith(f"{name}: "):
            return "media_error", "", " ".join(str(e).split())[:300], ""
        return _fail(e, label="MediaError without the source name")
    except BadOutput as e:
        return _fail(e, "bad_output", f"bad output of {call}")
    except Exception as e:  # noqa: BLE001 - that is what the fuzzer looks for
        return _fail(e)
    return "ok", "", "", ""


def _serve(conn, tmp: str, mem_bytes: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))
    import sora.data.shards  # noqa: F401 - import once, before the first timed call

    conn.send("ready")
    while (msg := conn.recv()) is not None:
        conn.send(run_call(*msg, tmp))


class Fuzzer:
    """Runs calls in a worker process, counts outcomes, saves reproducers of failures under `out`."""

    def __init__(self, out: Path, timeout: float = 10.0, mem_gb: float = 3.0):
        self.out, self.timeout, self.mem = Path(out), timeout, int(mem_gb * (1 << 30))
        self.tmp = tempfile.mkdtemp(prefix="sora-fuzz-")
        self.proc = self.conn = None
        self.counts, self.by_call = Counter(), defaultdict(Counter)
        self.failures: dict[str, list[dict]] = defaultdict(list)  # kind -> records

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.tmp, self.mem), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(120) or self.conn.recv() != "ready":
            raise RuntimeError("fuzz worker did not start")

    def _stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.join()
            self.conn.close()
        self.proc = None

    def run(self, call: str, data: bytes, ext: str, params: dict, note: dict) -> str:
        """Run one call on `data` (a file with extension `ext`) in the worker; returns the status."""
        if self.proc is None:
            self._start()
        self.conn.send((call, data, ext, params))
        try:
            result = self.conn.recv() if self.conn.poll(self.timeout) else None
        except (EOFError, OSError):  # the worker died
            self.proc.join(5)
            code = self.proc.exitcode
            sig = signal.Signals(-code).name if code is not None and code < 0 else f"exit {code}"
            result = ("crash", f"crash of {call} ({sig})", f"worker died: {sig}", "")
            self._stop()
        if result is None:
            result = ("hang", f"hang of {call}", f"no answer in {self.timeout:g}s", "")
            self._stop()
        status, kind, msg, tb = result
        self.counts[status] += 1
        self.by_call[call][status] += 1
        if status in FAILURES:
            rec = {"call": call, "ext": ext, "params": params, "message": msg, "traceback": tb, **note}
            if sum(r.get("seed") == note.get("seed") for r in self.failures[kind]) < 3:  # 3 per kind and seed file
                stem = self.out / re.sub(r"[^\w.-]+", "_", kind)[:100] / hashlib.sha1(data).hexdigest()[:12]
                stem.parent.mkdir(parents=True, exist_ok=True)
                rec["input"] = str(stem.with_suffix(f".{ext}"))
                stem.with_suffix(f".{ext}").write_bytes(data)
                stem.with_suffix(".json").write_text(json.dumps(rec, indent=1, default=repr))
            self.failures[kind].append(rec)
        return status

    def summary(self) -> str:
        c = self.counts
        lines = [f"fuzz: {sum(c.values())} inputs: {c['ok']} ok, {c['media_error']} MediaError, "
                 f"{sum(c[s] for s in FAILURES)} failures ({', '.join(f'{s} {c[s]}' for s in FAILURES)})"]
        lines += [f"  {call}: " + ", ".join(f"{s} {n}" for s, n in sorted(cnt.items()))
                  for call, cnt in sorted(self.by_call.items())]
        for kind, recs in sorted(self.failures.items(), key=lambda kv: -len(kv[1])):
            by = [", ".join(f"{v} {n}" for v, n in Counter(r.get(f) for r in recs).most_common())
                  for f in ("call", "seed")]
            lines += [f"- {kind}: {len(recs)}x [{by[0]}; seed {by[1]}]", f"    {recs[0]['message']}",
                      f"    {recs[0]['input']}"]
        return "\n".join(lines)

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(5)
        self._stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv=None) -> None:
    """Replay saved reproducers in this process: ``python tools/fuzz_media.py outputs/fuzz/*/*.json``."""
    for rec_path in argv if argv is not None else sys.argv[1:]:
        rec = json.loads(Path(rec_path).read_text())
        with tempfile.TemporaryDirectory() as tmp:
            status, kind, msg, tb = run_call(rec["call"], Path(rec["input"]).read_bytes(), rec["ext"], rec["params"],
                                             tmp)
        print(f"{rec_path}: {rec['call']} -> {status} {kind}\n  {msg}\n{tb}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
