"""The process exit codes of `effnetv2_jax.main` and `effnetv2_jax.sweep`, defined once.

0  done, or preempted (SIGTERM: the current step is checkpointed; rerun to resume)
2  bad input: a config field, a dataset not prepared, a checkpoint of another model, a workdir in
   use; printed as one `error: ...` line without a traceback
3  training diverged (too many consecutive non-finite steps; the last good checkpoint is kept)
"""

OK = 0
BAD_INPUT = 2
DIVERGED = 3
WRITE_FAILED = 4
