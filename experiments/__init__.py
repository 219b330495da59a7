"""absl-flag experiments run through `python launch.py --experiment=NAME`."""
