"""Tests of the dsv3 library."""
