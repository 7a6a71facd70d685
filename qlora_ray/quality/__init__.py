"""The eval stage: every tenant's configurations (configs.py) scored on its held-out rows
(scoring.py, tenant.py; the naive-PTQ base in ptq.py), the quality gate (gate.py) and its verdicts
(verdicts.py), the report (report.py), on Ray (launch.py)."""
