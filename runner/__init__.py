"""Planner, worker loop and command line of the sweep runner (`python -m runner`)."""
