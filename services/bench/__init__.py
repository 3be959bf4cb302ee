"""Benchmarks behind `trisect bench <name>`: each module has `main(argv) -> int`, prints figures
measured side by side in one run, and writes them with `--json FILE`."""
