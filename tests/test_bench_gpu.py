"""The GPU benchmark's log reader (the benchmark itself needs a GPU and runs outside CI)."""

from experiments import bench_gpu

# Lines as XLA (jaxlib 0.10 on CPU, 0.11 on CUDA) writes them with TF_CPP_VMODULE=hlo_pass_pipeline=1;
# the microseconds in parentheses are exact whatever unit the first figure uses.
LOG = """\
I1128 18:00:09.814007     540 hlo_pass_pipeline.cc:206] HLO pass: cublas-gemm-rewriter time: 4 us (4 us) (cumulative: 49 s, max: 29.6 s, #called: 1965)
I1128 18:00:09.814249     540 hlo_pass_pipeline.cc:206] HLO pass: config-assigner time: 2.03 s (2030289 us) (cumulative: 51 s, max: 29.6 s, #called: 1966)
I1128 17:46:58.287478   31187 hlo_pass_pipeline.cc:176] HLO pass: flatten-call-graph time: 203 ms (202964 us) (cumulative: 208 ms, max: 203 ms, #called: 515)
I1128 18:02:34.609105     540 hlo_pass_pipeline.cc:206] HLO pass: config-assigner time: 1.22 min (73100000 us) (cumulative: 2 min, max: 1.22 min, #called: 2000)
[jax   30.0s] main thread is at:
I1128 18:00:09.814249     540 hlo_pass_pipeline.cc:302] Running HLO pass pipeline on module jit_init: config-assigner
"""


def test_pass_times_sum_per_pass_in_exact_microseconds_and_rank_slowest_first():
  ranked = bench_gpu.summarize_pass_times(LOG, top=2)
  assert [name for name, _, _ in ranked] == ["config-assigner", "flatten-call-graph"]
  name, seconds, calls = ranked[0]
  assert calls == 2 and abs(seconds - (2.030289 + 73.1)) < 1e-9
  assert bench_gpu.summarize_pass_times("no XLA log here") == []
