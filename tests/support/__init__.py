"""Helpers shared by the test modules, each defined once (fixtures stay in conftest.py).

commands: `python -m runner ...` as a user runs it (plan, workers, refusals); waiting: poll
until true; training: runs compared bit for bit; queues: databases, sweeps and their digests;
serve: the dashboard's server process; skips: skip where the machine lacks something, fail
under CI; browser: headless chromium; masks: the attention masks written out by hand;
tensorboard: reading event files back. Servers and audits shared with bench/ are in testing/.
"""
