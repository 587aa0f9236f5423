"""Benchmarks: cadenza against the physical limit (raw nats-py) and against Temporal, in one run.

Run ``python -m bench`` (or ``python -m bench --quick`` for the smoke test). The figures, what each
one measures and the machine they came from are in docs/performance.md.
"""
