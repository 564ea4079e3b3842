r"""Create (or reuse) a Cloud TPU VM slice, install this package on every worker, start a run on all.

  python -m experiments.tpu.launch --name=effnet-s --zone=us-central2-b --accelerator_type=v4-32 \
      --config=configs/imagenet.py:variant=s,preset=paper --workdir=gs://BUCKET/runs/s-paper \
      --data_dir=gs://BUCKET/tensorflow_datasets [--spot] [--dry_run]
  python -m experiments.tpu.launch ... --sweep=sweeps/lr.yaml      # a sweep instead of one config

Steps, each a `gcloud compute tpus tpu-vm ...` command (`--dry_run` prints them and runs nothing):
  1. `describe` the VM: READY is reused; missing is created; PREEMPTED/TERMINATED (a spot slice that
     was taken back) is deleted and created again;
  2. ship the committed tree (`git archive HEAD`) to every worker (`scp --worker=all`) and install it
     with `jax[tpu]` into ~/venv on every worker (`ssh --worker=all`);
  3. start `effnetv2_jax.main` (or `effnetv2_jax.sweep`) on every worker at once, detached, logging
     to ~/run.log: JAX finds the other hosts itself, and each host reads its own shard of the data.
Re-running the same command after a preemption recreates the slice and resumes from the workdir's
latest checkpoint. Pass-through `--config.x=y` flags go to every trial.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REMOTE_DIR = "~/effnetv2_jax"
REMOTE_VENV = "~/venv"
REMOTE_LOG = "~/run.log"
TARBALL = "effnetv2_jax.tar.gz"
JAX_TPU = "jax[tpu]>=0.10,<0.12"  # the same range as setup.py's jax
RECREATE_STATES = ("PREEMPTED", "TERMINATED")


def _gcloud(args, verb: str, *rest: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}"]
  if args.project:
    cmd.append(f"--project={args.project}")
  return cmd


def describe_cmd(args):
  return _gcloud(args, "describe", args.name, "--format=value(state)")


def delete_cmd(args):
  return _gcloud(args, "delete", args.name, "--quiet")


def create_cmd(args):
  cmd = _gcloud(
    args,
    "create",
    args.name,
    f"--accelerator-type={args.accelerator_type}",
    f"--version={args.version}",
  )
  if args.spot:
    cmd.append("--spot")
  return cmd


def ssh_cmd(args, command: str):
  return _gcloud(args, "ssh", args.name, "--worker=all", f"--command={command}")


def archive_cmd(local_tar: str):
  return ["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={local_tar}", "HEAD"]


def scp_cmd(args, local_tar: str):
  return _gcloud(args, "scp", local_tar, f"{args.name}:~/{TARBALL}", "--worker=all")


def install_command() -> str:
  return " && ".join(
    [
      f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR}",
      f"tar xzf ~/{TARBALL} -C {REMOTE_DIR}",
      f"(test -x {REMOTE_VENV}/bin/python || python3 -m venv {REMOTE_VENV})",
      f"{REMOTE_VENV}/bin/pip install -q -U pip",
      f"{REMOTE_VENV}/bin/pip install -q -e {REMOTE_DIR} {shlex.quote(JAX_TPU)}",
    ]
  )


def run_argv(args, passthrough: list[str]) -> list[str]:
  """The training (or sweep) command every worker runs."""
  py = f"{REMOTE_VENV}/bin/python"
  if args.sweep:
    argv = [
      py,
      "-m",
      "effnetv2_jax.sweep",
      f"--config={args.config}",
      f"--sweep={args.sweep}",
      f"--workdir={args.workdir}",
    ]
  else:
    argv = [py, "-m", "effnetv2_jax.main", f"--config={args.config}", f"--workdir={args.workdir}"]
  if args.data_dir:
    argv.append(f"--config.data_dir={args.data_dir}")
  return argv + passthrough


def start_command(args, passthrough: list[str]) -> str:
  # Detached (setsid nohup) so the ssh session can end; `~` must stay unquoted to expand remotely.
  run = " ".join(a if a.startswith("~/") else shlex.quote(a) for a in run_argv(args, passthrough))
  return f"cd {REMOTE_DIR} && setsid nohup {run} > {REMOTE_LOG} 2>&1 < /dev/null &"


def plan(args, passthrough: list[str], state: str | None) -> list[list[str]]:
  """Every command after `describe`, given the VM's state (None = it does not exist)."""
  local_tar = os.path.join(args.tmp_dir, TARBALL)
  cmds = []
  if state in RECREATE_STATES:
    cmds.append(delete_cmd(args))
  if state is None or state in RECREATE_STATES:
    cmds.append(create_cmd(args))
  cmds += [
    archive_cmd(local_tar),
    scp_cmd(args, local_tar),
    ssh_cmd(args, install_command()),
    ssh_cmd(args, start_command(args, passthrough)),
  ]
  return cmds


def _state(args) -> str | None:
  proc = subprocess.run(describe_cmd(args), capture_output=True, text=True)
  if proc.returncode != 0:
    if "NOT_FOUND" in proc.stderr or "not found" in proc.stderr.lower():
      return None
    raise SystemExit(f"error: gcloud describe failed: {proc.stderr.strip().splitlines()[-1:]}")
  return proc.stdout.strip() or None


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--name", required=True, help="TPU VM name")
  p.add_argument("--zone", required=True, help="e.g. us-central2-b (v4) or us-east5-a (v5p)")
  p.add_argument("--project", default="", help="default: gcloud's configured project")
  p.add_argument(
    "--accelerator_type", default="v4-32", help="v4-8, v4-32, v5p-16, v5litepod-16, ..."
  )
  p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM software version")
  p.add_argument("--spot", action="store_true", help="a spot slice (cheaper, can be preempted)")
  p.add_argument("--config", required=True, help="config file[:args], relative to the repo root")
  p.add_argument(
    "--workdir", required=True, help="a path every worker sees, e.g. gs://BUCKET/runs/x"
  )
  p.add_argument(
    "--data_dir", default="", help="TFDS data_dir, e.g. gs://BUCKET/tensorflow_datasets"
  )
  p.add_argument(
    "--sweep", default="", help="a sweep spec (relative to the repo root) instead of one run"
  )
  p.add_argument("--tmp_dir", default="/tmp", help="where the local tarball is written")
  p.add_argument("--dry_run", action="store_true", help="print every command, run none")
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    p.error(
      f"unrecognized arguments: {' '.join(bad)} (only --config.<field>=<value> passes through)"
    )
  return args, rest


def main(argv=None) -> int:
  args, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
  show = lambda cmd: print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
  show(describe_cmd(args))
  if args.dry_run:
    print("# dry run: assuming the TPU VM does not exist yet", flush=True)
    state = None
  else:
    state = _state(args)
    print(f"# {args.name}: {state or 'does not exist'}", flush=True)
  for cmd in plan(args, passthrough, state):
    show(cmd)
    if not args.dry_run:
      subprocess.run(cmd, check=True)
  log = ssh_cmd(args, f"tail -n 20 {REMOTE_LOG}")
  print(
    "# follow it:  " + " ".join(shlex.quote(c) for c in log).replace("--worker=all", "--worker=0")
  )
  print(f"# TensorBoard:  tensorboard --logdir {args.workdir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
