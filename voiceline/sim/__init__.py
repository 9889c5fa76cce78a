"""Simulated callers (real PJSIP user agents in their own processes) and pytest fixtures."""
