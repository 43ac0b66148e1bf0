"""Reliability tooling of the library store: the crash matrix (kill a writer at every step of the write
protocol), the concurrency stress run (writers killed at random beside readers), and the fuzzers."""
