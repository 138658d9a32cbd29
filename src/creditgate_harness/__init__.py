"""The fault harness: a rig to break, traffic in and out, the invariants, the workload.

Not part of the ``creditgate`` runtime package: the fault tests (``tests/faults``), the
soak (``python -m bench.soak``) and the benchmark (``python -m bench.run``) import it.

- ``faultrun``: ``FaultRun``, one run (rig, workload streamed in, observer, verdict);
- ``rig``: a broker, Redis and ``creditgate worker`` processes to kill and pause;
- ``traffic``: the producer that keeps what it sent, the reader of the outputs;
- ``invariants``: DESIGN §1 and §6 checked from the outside;
- ``workload``: the deterministic stream of commands and requests.
"""
