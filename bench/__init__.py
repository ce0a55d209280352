"""Benchmarks and the candidates they measure; each script prints JSON lines. Run them from the
repository root as modules: ``python -m bench.throughput``, ``python -m bench.kernels`` ..."""
