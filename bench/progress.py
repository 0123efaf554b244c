"""Progress of long loops: a tqdm bar on a terminal, a plain line every N seconds elsewhere.

A SLURM job's `.out` is no terminal, and a tqdm bar there is either off or a wall of carriage
returns; so without a terminal (stderr not a TTY) a `Progress` prints one line to stdout, as
SiT's and DiT's training logs do:

    train step 1200/400000 (0.3%) loss 0.4123 312.4 img/s eta 3d 04:12

(done/total, the loop's own values such as the loss, images per second over the last interval
and the time left at that rate), on the first update, then every REDI_BENCH_PROGRESS_EVERY
seconds (default 60; 0 prints every update) and once at the end. Training, sampling, evaluation's
feature passes and prepare's encoding and model training all report through it; under DDP only
rank 0 does (`enabled`).

Torch-free; tqdm is imported only when a terminal shows the bar.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

EVERY_ENV = "REDI_BENCH_PROGRESS_EVERY"
DEFAULT_EVERY_S = 60.0


class ProgressError(ValueError):
    """REDI_BENCH_PROGRESS_EVERY is not a number of seconds."""


def every_seconds() -> float:
    """Seconds between two plain progress lines (REDI_BENCH_PROGRESS_EVERY, default 60)."""
    value = os.environ.get(EVERY_ENV, "").strip()
    try:
        seconds = float(value) if value else DEFAULT_EVERY_S
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise ProgressError(f"{EVERY_ENV}={value!r}: give the seconds between two progress lines "
                            "(a number >= 0; 0 prints every update)")
    return seconds


def format_duration(seconds: float) -> str:
    """1:02:03 below a day, 3d 04:12 above (the precision a days-long ETA has)."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}d {hours:02d}:{minutes:02d}" if days else f"{hours}:{minutes:02d}:{secs:02d}"


def _value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class Progress:
    """`total` units of work (None: unknown), `initial` of them done before (a resume); each unit
    is `images_per_unit` images (a training step: the global batch). Use as a context manager, or
    iterate over it with `iterable` like tqdm; `update(n)` after each unit, `set_postfix(k=v)` for
    values shown with the count."""

    def __init__(self, label: str, total: Optional[int], *, initial: int = 0, images_per_unit: float = 1.0,
                 enabled: bool = True, iterable: Optional[Iterable] = None, stream: Optional[TextIO] = None,
                 terminal: Optional[bool] = None, every: Optional[float] = None) -> None:
        self.label, self.total, self.done, self.images_per_unit = label, total, initial, images_per_unit
        self.iterable, self.stream, self.postfix = iterable, stream, {}
        self.every = every_seconds() if every is None else every
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = None
        self.plain = enabled and not terminal
        if enabled and terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=label, dynamic_ncols=True, file=sys.stderr)
        self._mark_time, self._mark_done = time.perf_counter(), initial
        self._printed_at: Optional[int] = None
        self._last_rate: Optional[float] = None

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.plain:
            now = time.perf_counter()
            if self._printed_at is None or now - self._mark_time >= self.every:
                self._emit(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix.update(values)
        if self.bar is not None:
            self.bar.set_postfix({k: _value(v) for k, v in values.items()}, refresh=False)

    def line(self, now: Optional[float] = None) -> str:
        """The plain line for the work done so far; the rate is over the units since the last line."""
        now = time.perf_counter() if now is None else now
        units, seconds = self.done - self._mark_done, now - self._mark_time
        rate = units * self.images_per_unit / seconds if units > 0 and seconds > 0 else self._last_rate
        parts = [f"{self.label} {self.done}" + (f"/{self.total}" if self.total is not None else "")]
        if self.total:
            parts.append(f"({100.0 * self.done / self.total:.1f}%)")
        parts += [f"{key} {_value(value)}" for key, value in self.postfix.items()]
        if rate:
            parts.append(f"{rate:.1f} img/s")
            if self.total is not None and self.done < self.total:
                left = (self.total - self.done) * self.images_per_unit / rate
                parts.append(f"eta {format_duration(left)}")
        self._last_rate = rate
        return " ".join(parts)

    def _emit(self, now: float) -> None:
        print(self.line(now), file=self.stream or sys.stdout, flush=True)
        self._mark_time, self._mark_done, self._printed_at = now, self.done, self.done

    def close(self) -> None:
        """The last line (unless the count was just printed), and the bar closed."""
        if self.plain and self._printed_at != self.done and self.done > 0:
            self._emit(time.perf_counter())
        self.plain = False
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
