"""The eval stage: every tenant's configurations scored on its held-out rows (configs.py, tenant.py,
the naive-PTQ base in ptq.py), the quality gate (gate.py), the report (report.py), on Ray (launch.py)."""
