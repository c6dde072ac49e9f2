"""Operation contracts and their registered implementations (see aios_fast.backends)."""
