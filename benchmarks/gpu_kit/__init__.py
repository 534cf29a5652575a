"""The GPU kit behind `python benchmarks/gpu_suite.py`: one command that turns a lent GPU into evidence.

Modules: `plan` (every section's sizes, GPU and CPU smoke, in one place), `runner` (runs the sections, each in
its own process with a time cap, and writes the outputs), `context` (what a section gets and records),
`chips` (the card's datasheet peaks and the software versions), `flops` (the FLOP and byte counts behind MFU
and the bandwidth bound), `run_logs` (steps/s and final loss from the trainers' logs), `report` (the markdown),
and `sections/` (one module per measurement).
"""
