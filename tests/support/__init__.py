"""Plain helpers shared by the test suites; the conftests hold fixtures only."""
