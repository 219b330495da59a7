"""The one H:MM:SS formatter of every progress line (the attack, training, the
download, the experiments' ETAs), so that every line reads the same way."""


def format_duration(seconds: float) -> str:
    """H:MM:SS (whole seconds, rounded down), or "?" for an unknown (infinite)
    duration."""
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
