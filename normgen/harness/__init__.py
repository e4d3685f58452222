"""The harness: checking generated code against the reference, and benchmarking it."""
