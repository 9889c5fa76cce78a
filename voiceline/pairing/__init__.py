"""The anonymous pool, matching policy and the per-caller session state machine."""
