"""Validation helpers of the configuration, shared by ``config.py`` and the training methods' own keys
(``TrainingMethod.finalize_config``): each raises ValueError naming the key, the value and what is allowed."""
import math


def check_choice(cfg, key, choices):
    if cfg[key] not in choices:
        raise ValueError("unknown %s %r; choose one of: %s" % (key.replace("_", " "), cfg[key], ", ".join(choices)))


def check_range(cfg, key, low, high=None, low_open=False):
    """``cfg[key]`` must be a finite number >= low (> low with ``low_open``) and <= high."""
    value = cfg[key]
    bad = (value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
           or value < low or (low_open and value == low) or (high is not None and value > high))
    if bad:
        raise ValueError("%s must be %s %s%s, got %r" % (key, ">" if low_open else ">=", low,
                                                         "" if high is None else " and <= %s" % high, value))


def parse_numbers(flag, text, count=None):
    """The comma-separated numbers of a flag's text as a tuple of floats (``count`` of them, if given)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = None
    if values is None or (count is not None and len(values) != count) or not all(map(math.isfinite, values)):
        raise ValueError("%s takes %s comma-separated numbers, got %r" % (flag, count or "some", text))
    return values
