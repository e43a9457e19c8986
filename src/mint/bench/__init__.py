"""Benchmarks behind `mint bench NAME`: each module has `main(argv) -> int`, prints its
figures and writes them as JSON. Ratios are measured side by side in one run."""
