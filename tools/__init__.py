"""Command line, inspection tools, benchmarks and the demo."""
