"""Compile ahead: the next stage's train step (and the eval step) compile while this stage trains.

A progressive run changes its input shape at every stage switch, and each shape is one XLA compile
(about 10 s per demo stage on a 2-core CPU, about 145 s per EfficientNetV2-S stage on an H200).
`BackgroundCompiler` runs those compiles on one worker thread, started as soon as the stage before
begins, so the switch waits only for what is left. The programs are the ones the loop would compile
itself (same function, same abstract shapes and shardings), so the run's numbers do not depend on
whether the compile happened ahead: tests/test_train.py checks the params bitwise.

On a CPU the background compile shares the cores with training, so it slows the stage it overlaps;
`config.compile_ahead=False` compiles at the switch instead (experiments/bench_stage_switch.py
measures both). A compile that fails in the background is raised at the switch, naming the stage
(a stage that cannot fit in memory, memory_fit.DoesNotFitError, as itself: it names it already).
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, Hashable

from effnetv2_jax import memory_fit


class StageCompileError(RuntimeError):
  """A stage's step failed to compile; `str()` names the stage and the error's first line."""


def _timed(compile_fn: Callable[[], Any]) -> tuple[Any, float]:
  t0 = time.perf_counter()
  compiled = compile_fn()
  return compiled, time.perf_counter() - t0


class BackgroundCompiler:
  """`submit(key, fn)` starts `fn()` (a lower + compile) on the worker thread; `get(key, fn)`
  returns (compiled, compile seconds, seconds waited), compiling now if nothing was submitted."""

  def __init__(self, enabled: bool = True):
    self._pool = (
      concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile-ahead")
      if enabled
      else None
    )
    self._futures: dict[Hashable, concurrent.futures.Future] = {}

  def submit(self, key: Hashable, compile_fn: Callable[[], Any]) -> None:
    if self._pool is not None and key not in self._futures:
      self._futures[key] = self._pool.submit(_timed, compile_fn)

  def get(self, key: Hashable, compile_fn: Callable[[], Any]) -> tuple[Any, float, float]:
    t0 = time.perf_counter()
    future = self._futures.pop(key, None)
    try:
      compiled, compile_s = future.result() if future is not None else _timed(compile_fn)
    except memory_fit.DoesNotFitError:
      raise  # already one line naming the stage, its size and the bytes: a bad input, not a bug
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise StageCompileError(f"compiling {key} failed: {type(e).__name__}: {first}") from e
    return compiled, compile_s, time.perf_counter() - t0

  def close(self) -> None:
    """Drop compiles nobody will ask for (a preempted run) and let the worker finish."""
    if self._pool is not None:
      for future in self._futures.values():
        future.cancel()
      self._pool.shutdown(wait=True)
      self._pool = None
