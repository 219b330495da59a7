"""Reports of the experiments: figures, markdown/CSV tables, progress lines."""
