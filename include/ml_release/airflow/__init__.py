"""The only part of the core that imports Airflow: hooks, Params and task callables' glue."""
