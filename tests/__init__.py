"""memopt's test suite; a package so that spawned ranks can import test modules by name."""
