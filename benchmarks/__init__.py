"""The benchmark harness (and the launchers of the real services that tests share)."""
