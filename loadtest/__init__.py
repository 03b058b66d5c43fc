"""Chorus load test: locust users (`locustfile.py`), the run orchestration (`python -m loadtest`),
the SLO verdict (`verdict.py`), plots (`plot.py`) and the Prometheus helpers the observability
tests share (`prometheus.py`, `dashboard.py`)."""
