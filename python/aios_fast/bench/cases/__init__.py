"""One module per benchmark group, each with ``run(ctx) -> list[Figure]`` for ``aios-fast bench``
and the case bodies, fixtures and checks that ``benchmarks/bench_*.py`` time with pytest-benchmark."""
