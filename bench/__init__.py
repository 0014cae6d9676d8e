"""Benchmarks: `python -m bench.run` (make bench) measures each figure in its own process, writes
bench/results/<figure>.json and regenerates BENCHMARKS.md from every JSON file there.

Figures (one module each): quality (bench.quality), speed_engines / speed_server / speed_training
(bench.speed, bench.server_load, bench.training_speed), size (bench.size).
"""
