"""The command-line tools; `pip install -e .` installs the user tools as apt-* commands (pyproject.toml)."""
