"""The one exception type of the converter: a bad input, explained (file, key, expected vs found)."""


class ConversionError(ValueError):
    """An input that cannot be converted: unknown format, missing/unexpected/mis-shaped keys, bad files.

    The message is meant to be shown to a user as is (the CLI prints it without a traceback).
    """


class MissingKeysError(ConversionError, KeyError):
    """Required tensors absent from a state dict; also a KeyError, as a failed key lookup."""

    __str__ = ConversionError.__str__  # not KeyError's repr-quoted message


def listing(title: str, items, limit: int = 20) -> str:
    """'title (n): a; b; ... (+k more)' for an error message; '' when items is empty."""
    items = list(items)
    if not items:
        return ""
    more = f"; ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{title} ({len(items)}): " + "; ".join(map(str, items[:limit])) + more
