"""`make gpu-check` (`python -m moe_worker.bench.gpu_check`): one prepared run, on one GPU, of
every path moe-ep has that the CPU cannot prove, to one JSON and one Markdown table
(docs/gpu-results.md). `check` runs the parts, each in a process of its own under its own time
budget (`child`), and `report` writes the results and what `moe-ep perf` calibrates from:

- (a) `parity`: tiny Mixtral and Qwen3-MoE at world 1 against transformers (fp32 tokens, bf16);
- (b) `grouped`: grouped GEMM against the per-slot loop and dense cuBLAS, the seed's and
  Qwen3-30B-A3B's shapes, and the seed rank's attention;
- (c) `serving`: the serving engine at world 1 against transformers `generate()`;
- (d) `switch`: the background plan switch's pause against a decode step;
- (e) `overlap`: two-batch overlap with links emulated on a second stream;
- (f) `memory`: the free-memory check behind slot growth.

Every CUDA-only call sits behind `device.Device`, so each part also runs on the CPU at tiny sizes
(its `TINY` options), which is how the tests keep them from rotting.
"""
