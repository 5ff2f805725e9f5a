"""Helpers for checking dalimix's GPU code on machines without a GPU."""
