"""creditgate's benchmark harness: ``python -m bench.run`` (see ``bench/run.py``).

Not part of the installed package: it drives the real worker and two baselines
against a local Kafka and Redis and writes its report to ``bench/results/``.
"""
