"""Workdir guards: a lock so two runs never write the same workdir, and a SIGTERM flag.

Lock: `<workdir>/.lock` is JSON {pid, host, start_time, proc_start}. It is written to a private tmp
file and hard-linked into place, so it appears atomically and fully written (link fails if the lock
exists, like O_EXCL). A lock whose pid is dead on this host -- or alive but a different process, as
seen from its /proc start time -- is stale: it is taken over with a warning. A lock from another
host cannot be checked and is refused, naming that host.

Remote workdirs (gs://BUCKET/run): GCS offers no create-if-absent through etils.epath, so the lock
there is ADVISORY only: `<workdir>/.lock` is read, refused if held by a live run (same rules as
above: another host's lock is always refused, never pid-checked), then overwritten with this run's
record and read back. Two runs starting within the same second can both pass; a warning says so.
A run killed without cleanup leaves the lock behind; a new VM (another hostname) then refuses it
until the file is deleted, as the error message says.

Preemption: GCP sends SIGTERM about 30 s before it stops a VM. The handler only sets a flag; the
training loop polls it once per step, saves the current step and returns (exit code 0).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time

from effnetv2_jax import paths

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


def _proc_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (field 22 of /proc/pid/stat), to detect pid reuse."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
    return stat.rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _holder_alive(info: dict) -> bool:
  pid = int(info.get("pid", -1))
  if pid <= 0 or not _pid_alive(pid):
    return False
  recorded, now = info.get("proc_start"), _proc_start(pid)
  return not (recorded and now and recorded != now)  # same pid, other process => stale


class WorkdirLock:
  """Context manager: `with WorkdirLock(workdir): ...`. acquire() raises WorkdirLockedError."""

  def __init__(self, workdir: str):
    self.remote = paths.is_remote(workdir)
    self.workdir = workdir
    self.path = paths.join(workdir, LOCK_NAME)
    self.held = False

  def _read(self) -> dict | None:
    try:
      if self.remote:
        return json.loads(paths.read_text(self.path))
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable: treated as stale below

  def _refuse_if_held(self, other: dict, where: str):
    """Raise WorkdirLockedError unless `other` (a lock record, may be {}) is stale."""
    host = other.get("host")
    if other and host != socket.gethostname():
      raise WorkdirLockedError(
        f"workdir {where} is locked by pid {other.get('pid')} on host "
        f"{host} (since {other.get('start_time')}); if that run is gone, delete {self.path}"
      )
    if other and _holder_alive(other):
      raise WorkdirLockedError(
        f"workdir {where} is in use by a running job: pid "
        f"{other.get('pid')} on {host} since {other.get('start_time')}"
      )
    logging.warning(
      "taking over stale lock %s (pid %s on %s is not running)", self.path, other.get("pid"), host
    )

  def _acquire_remote(self, info: dict) -> "WorkdirLock":
    logging.warning(
      "workdir %s is remote: its lock %s is advisory (no atomic create on object "
      "stores); do not start two runs on it at the same time",
      self.workdir,
      self.path,
    )
    other = self._read()
    if other is not None:
      self._refuse_if_held(other, self.workdir)
    paths.makedirs(self.workdir)
    paths.write_text(self.path, json.dumps(info))
    if self._read() != info:  # another run wrote after us: let it have the workdir
      raise WorkdirLockedError(f"could not take the lock {self.path} (contended)")
    self.held = True
    return self

  def acquire(self) -> "WorkdirLock":
    info = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "proc_start": _proc_start(os.getpid()),
    }
    if self.remote:
      return self._acquire_remote(info)
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    tmp = f"{self.path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(info, f)
    try:
      for _ in range(3):
        try:
          os.link(tmp, self.path)  # atomic, fails if the lock exists
          self.held = True
          return self
        except FileExistsError:
          pass
        other = self._read()
        if other is None:
          continue  # released meanwhile: try again
        self._refuse_if_held(other, os.path.dirname(self.path))
        try:
          os.unlink(self.path)
        except FileNotFoundError:
          pass
      raise WorkdirLockedError(f"could not take the lock {self.path} (contended)")
    finally:
      os.unlink(tmp)

  def release(self):
    if self.held:
      info = self._read()
      if info and info.get("pid") == os.getpid():
        if self.remote:
          if info.get("host") == socket.gethostname():
            paths.remove(self.path)
        else:
          os.unlink(self.path)
      self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


class PreemptionFlag:
  """Installs a SIGTERM (and optionally SIGINT) handler that only records the request.

  Use as a context manager; the previous handlers come back on exit. Outside the main thread
  (e.g. under some test runners) signals cannot be hooked, and the flag simply never fires.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self.signals = signals
    self._event = threading.Event()
    self._previous = {}
    self.signum = None

  def _handler(self, signum, frame):
    del frame
    self.signum = signum
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def request(self):
    """Set the flag programmatically (tests, or an external preemption notice)."""
    self._event.set()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous.clear()
