"""Job folders in S3-compatible object storage (`--out-root s3://BUCKET/PREFIX`).

s3: the client, addresses, one-line errors and retries. jobfolder: how a job folder is laid
out in the bucket (attempt-keyed objects, a fenced head). sync: the worker's working copy,
fetched on claim and uploaded in the background. view: a local copy for readers.
"""
