"""Benchmarks of instaflow-pl: each reports ratios against a baseline run in the same process (`make bench`)."""
