"""`alignkit bench`: the benchmark fixture, the TRL peer script and the throughput harness."""
