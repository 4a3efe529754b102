"""`radflow console`: the web console for data teams, auditors and reviewers (see `app.py`)."""
