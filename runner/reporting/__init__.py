"""Looking at a sweep: the results table, figures, the dashboard, the HTML report, exports.

Reads the queue (through runner.status) and the job folders; never changes either.
"""
