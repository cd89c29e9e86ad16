"""What the tests, the bench and the fault suite run against: the run's keys and settings,
real Temporal servers from the installed binaries, a mail sink, the web app in its own process,
loopback ports and realistic data. Tools import this package, never the test suite."""
