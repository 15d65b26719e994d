"""Measurement, never imported by the product: `moe-worker bench` (`command`, `data_path`,
`baseline`), `moe-worker bench-serving` (`serving`), the GPU checks (`gpu_check`, `gpu_grouped`)
and the world-1 reference generator the tests compare against (`generator`)."""
