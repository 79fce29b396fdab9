"""Coverage-guided fuzzers of the edge (atheris); see fuzz/README.md."""
