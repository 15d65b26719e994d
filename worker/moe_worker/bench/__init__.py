"""Measurement, never imported by the product: `moe-worker bench` (`command`, `data_path`,
`baseline`), `moe-worker bench-serving` (`serving`), the GPU check (`gpu_check`, `make gpu-check`)
and the world-1 reference generator the tests compare against (`generator`)."""
