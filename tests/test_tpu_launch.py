"""The TPU VM launcher in dry-run mode: the commands it would run, none of them executed."""

import pytest

from experiments.tpu import launch

BASE = [
  "--name=effnet-s",
  "--zone=us-central2-b",
  "--accelerator_type=v4-32",
  "--config=configs/imagenet.py:variant=s,preset=paper",
  "--workdir=gs://bkt/runs/s-paper",
  "--data_dir=gs://bkt/tfds",
  "--dry_run",
]


def _commands(capsys, argv):
  assert launch.main(argv) == 0
  return [l[2:] for l in capsys.readouterr().out.splitlines() if l.startswith("$ ")]


def test_dry_run_creates_installs_and_starts_on_every_worker(capsys):
  cmds = _commands(capsys, BASE + ["--spot", "--config.batch_size=2048"])
  assert cmds[0].startswith("gcloud compute tpus tpu-vm describe effnet-s")
  create = [c for c in cmds if " tpu-vm create " in c]
  assert len(create) == 1 and "--accelerator-type=v4-32" in create[0] and "--spot" in create[0]
  remote = [c for c in cmds if " tpu-vm ssh " in c or " tpu-vm scp " in c]
  assert len(remote) == 3 and all("--worker=all" in c for c in remote)
  install, start = remote[1], remote[2]
  assert "pip install" in install and "jax[tpu]" in install
  assert "effnetv2_jax.main" in start and "configs/imagenet.py:variant=s,preset=paper" in start
  assert "--workdir=gs://bkt/runs/s-paper" in start and "--config.data_dir=gs://bkt/tfds" in start
  assert "--config.batch_size=2048" in start and "nohup" in start
  assert all("--zone=us-central2-b" in c for c in cmds if c.startswith("gcloud"))


def test_dry_run_of_a_sweep_starts_the_sweep_runner(capsys):
  cmds = _commands(capsys, BASE + ["--sweep=sweeps/lr.yaml"])
  start = cmds[-1]
  assert "effnetv2_jax.sweep" in start and "--sweep=sweeps/lr.yaml" in start
  assert "--worker=all" in start and "gs://bkt/runs/s-paper" in start


def test_a_ready_vm_is_reused_and_a_preempted_one_recreated():
  args, rest = launch.parse_args(BASE)
  verbs = lambda state: [c[4] for c in launch.plan(args, rest, state) if c[0] == "gcloud"]
  assert verbs("READY") == ["scp", "ssh", "ssh"]
  assert verbs(None) == ["create", "scp", "ssh", "ssh"]
  assert verbs("PREEMPTED") == ["delete", "create", "scp", "ssh", "ssh"]


def test_unknown_flags_are_refused():
  with pytest.raises(SystemExit):
    launch.parse_args(BASE + ["--workers=all"])
