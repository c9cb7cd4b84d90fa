"""Edit-quality evaluation in the shapes world: held-out cases, metrics, and the benchmark runner."""
