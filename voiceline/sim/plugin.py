"""Pytest plugin: fixtures that start a voiceline server and place simulated calls."""
