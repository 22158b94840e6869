"""Job records and their state machine."""
