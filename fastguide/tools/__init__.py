"""Tools around the package: the ``fastguide`` command line (``cli``), the whole-loop benchmark
(``bench``) and the op counter the tests and benchmarks use (``opcount``)."""
