"""great-expectations suites for input data and the runner that turns results into reports."""
