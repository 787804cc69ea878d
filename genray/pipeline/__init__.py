"""`genray pipeline`: train -> eval -> gate -> bulk jobs -> serve as one resumable run. stages.py runs the stages,
report.py writes the run's report."""
