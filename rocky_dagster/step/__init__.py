"""The guarded step's lifecycle: keys, the one guard, heartbeats, what the UI shows."""
