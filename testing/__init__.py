"""Throwaway servers and checks shared by the tests and the benchmarks.

Outside `tests/` so that `bench/` can use them without importing the test suite:
pgserver (PostgreSQL), s3server (SeaweedFS), slurmcluster (SLURM), tcpproxy (a TCP proxy
with faults) and audit (checks over the events table).
"""
