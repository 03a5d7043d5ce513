"""Plain-PyTorch float64 references for every op: what the tests compare the compiled kernels with,
and readable documentation of each algorithm. The library's own paths never call these."""
