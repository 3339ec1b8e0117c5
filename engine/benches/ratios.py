#!/usr/bin/env python3
"""Print each benchmark group's results and Tandem's ratio to its floor.

Reads criterion's estimates (target/criterion/<group>/<bench>/new/estimates.json).
A ratio is floor_time / tandem_time for throughput groups: 1.0 means as fast
as the floor, 0.8 means 80% of the floor's throughput.
"""
import json
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parents[2] / "target" / "criterion"
if not root.is_dir():
    sys.exit(f"no criterion results under {root}: run `cargo bench -p tandem-engine` first")

for group in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "report"):
    times = {}
    for bench in sorted(p for p in group.iterdir() if p.is_dir() and p.name != "report"):
        est = bench / "new" / "estimates.json"
        if est.exists():
            times[bench.name] = json.loads(est.read_text())["median"]["point_estimate"]
    if not times:
        continue
    print(f"{group.name}:")
    for name, ns in times.items():
        print(f"  {name:45s} {ns / 1e6:12.3f} ms")
    floors = [n for n in times if n.startswith("floor_")]
    ours = [n for n in times if n.startswith("tandem_")]
    for f in floors:
        for o in ours:
            print(f"  ratio {o} vs {f}: {times[f] / times[o]:.2f}x the floor's throughput")
