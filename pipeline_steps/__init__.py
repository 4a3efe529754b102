"""radflow pipeline steps: plain typed functions, no orchestration."""
