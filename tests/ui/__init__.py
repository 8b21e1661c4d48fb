"""Tests of the app (ui/) as plain Python."""
