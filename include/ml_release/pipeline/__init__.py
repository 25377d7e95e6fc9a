"""The pipeline's steps as plain functions: each is a transaction that a retry can run again.

The Airflow tasks in ``dags/`` are thin wrappers around these; a test can call them directly.
"""
