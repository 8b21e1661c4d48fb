"""The app end to end: over HTTP and in a real browser."""
